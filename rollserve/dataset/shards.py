"""The output folder of a rollout dataset: atomically written shards and a manifest.

Layout: `train-00000.parquet` (or `.jsonl`), `train-00001...`, `manifest.json`.
The `train-` prefix is what makes `datasets.load_dataset(fmt, data_dir=...)`
read the shards as the train split and leave `manifest.json` alone. A shard
is written under a hidden temporary name, flushed to disk and renamed, so a
kill at any moment leaves whole shards only; every shard holds all samples of
the prompts it covers, so "done" is decided per prompt.
"""

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

FORMATS = ("parquet", "jsonl")
MANIFEST = "manifest.json"
_SHARD = re.compile(r"^train-(\d+)\.(parquet|jsonl)$")
_TEMP = re.compile(r"^\.train-\d+\.(parquet|jsonl)\.tmp$")


_OVERWRITE = "--overwrite (overwrite=True) starts it again"


class OutputDirError(ValueError):
    """The output folder cannot be used as asked (other parameters, foreign files, damaged shards)."""


def model_id(model: str) -> str:
    """How the manifest names a model: a local path resolved, anything else as given."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def dataset_config(prompt_set, params: dict, chat: bool, prompt_field: str, fmt: str, reward: str | None,
                   model: str, dtype: str | None, env: str | None = None, max_turns: int | None = None) -> dict:
    """The parameters a dataset is generated with, as its manifest records them (`params`: the SamplingParams
    as a dict; `dtype`: the weights', e.g. "float32"; None: not known yet, left out; `env`, `max_turns`: the
    environment of an episode dataset, None for completions). Episodes always render the chat template."""
    config = {"model": model_id(model), "dtype": dtype, "sampling_params": params, "chat": chat or env is not None,
              "prompt_field": prompt_field, "input_fingerprint": prompt_set.fingerprint,
              "num_prompts": len(prompt_set), "format": fmt, "reward": reward, "env": env,
              "max_turns": max_turns if env is not None else None}
    return config if dtype is not None else {k: v for k, v in config.items() if k != "dtype"}


def config_changes(old: dict, new: dict) -> list[str]:
    """`name: old -> new` for every parameter that differs, sampling parameters by their own names
    (`temperature: 1.0 -> 0.7`)."""
    def flat(config: dict) -> dict:
        return {**{k: v for k, v in config.items() if k != "sampling_params"}, **config.get("sampling_params", {})}

    old, new = flat(old), flat(new)
    return [f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in sorted(old.keys() | new.keys())
            if old.get(k) != new.get(k)]


def arrow_schema(with_reward: bool):
    import pyarrow as pa

    fields = [
        ("prompt_index", pa.int64()), ("prompt", pa.string()), ("sample_index", pa.int64()),
        ("prompt_token_ids", pa.list_(pa.int32())), ("completion", pa.string()),
        ("completion_token_ids", pa.list_(pa.int32())), ("logprobs", pa.list_(pa.float32())),
        ("cumulative_logprob", pa.float64()), ("finish_reason", pa.string()), ("weight_version", pa.int64()),
    ]
    if with_reward:
        fields.append(("reward", pa.float64()))
    return pa.schema(fields)


def episode_schema():
    """The rows of an episode dataset (`--env`): one per (prompt, sample) episode, `reward` the sum of `rewards`."""
    import pyarrow as pa

    return pa.schema([
        ("prompt_index", pa.int64()), ("prompt", pa.string()), ("sample_index", pa.int64()),
        ("token_ids", pa.list_(pa.int32())), ("mask", pa.list_(pa.int8())), ("logprobs", pa.list_(pa.float32())),
        ("weight_versions", pa.list_(pa.int64())), ("num_prompt_tokens", pa.int64()),
        ("rewards", pa.list_(pa.float64())), ("reward", pa.float64()), ("num_turns", pa.int64()),
        ("finish_reason", pa.string()), ("error", pa.string()), ("messages", pa.string()),
    ])


@dataclass
class DatasetStats:
    """What the shards hold: which prompts are done, and counts over all rows."""

    prompt_indices: set[int] = field(default_factory=set)
    num_rows: int = 0
    num_shards: int = 0
    finish_reasons: Counter = field(default_factory=Counter)
    reward_sum: float = 0.0
    reward_count: int = 0

    def add(self, prompt_index: list[int], finish_reason: list[str], reward: list[float] | None) -> None:
        self.prompt_indices.update(prompt_index)
        self.num_rows += len(prompt_index)
        self.num_shards += 1
        self.finish_reasons.update(finish_reason)
        if reward is not None:
            self.reward_sum += sum(reward)
            self.reward_count += len(reward)

    @property
    def mean_reward(self) -> float | None:
        return self.reward_sum / self.reward_count if self.reward_count else None

    def as_dict(self) -> dict:
        return {"prompts_done": len(self.prompt_indices), "rows": self.num_rows, "shards": self.num_shards,
                "finish_reasons": dict(self.finish_reasons), "mean_reward": self.mean_reward}


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


class ShardStore:
    def __init__(self, out_dir, fmt: str, with_reward: bool, episodes: bool = False):
        if fmt not in FORMATS:
            raise ValueError(f"format={fmt!r} is invalid: must be one of {', '.join(FORMATS)}")
        self.dir = Path(out_dir)
        self.fmt = fmt
        self.with_reward = with_reward or episodes
        self.schema = episode_schema() if episodes else arrow_schema(with_reward)
        self._next = 0

    def _shards(self) -> list[tuple[int, Path]]:
        if not self.dir.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.dir.iterdir() if (m := _SHARD.match(p.name))]
        return sorted(found)

    def read_manifest(self) -> dict | None:
        path = self.dir / MANIFEST
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise OutputDirError(f"{path}: damaged ({e}); {_OVERWRITE}") from None

    def write_manifest(self, manifest: dict) -> None:
        _atomic_write(self.dir / MANIFEST, lambda f: f.write(json.dumps(manifest, indent=2).encode()))

    def check(self, config: dict, resume: bool, overwrite: bool) -> None:
        """Refuses a folder this run must not write to; changes nothing. `config` may hold some of the
        manifest's fields only (those known before the model loads): the others are not compared."""
        if self.dir.exists() and not self.dir.is_dir():
            raise OutputDirError(f"output_dir {self.dir} exists and is not a folder")
        if overwrite:
            return
        manifest = self.read_manifest()
        shards = self._shards()
        if manifest is None:
            if shards:
                raise OutputDirError(f"{self.dir} holds {len(shards)} shard(s) but no {MANIFEST}; {_OVERWRITE}")
            return
        recorded = manifest.get("config", {})
        if changes := config_changes({k: recorded.get(k) for k in config}, config):
            raise OutputDirError(f"{self.dir} was generated with other parameters ({'; '.join(changes)}): "
                                 f"use another output folder, or {_OVERWRITE}")
        if not resume and shards:
            raise OutputDirError(f"{self.dir} already holds {len(shards)} shard(s) and resume is off; {_OVERWRITE}")

    def finished(self, config: dict, n: int) -> DatasetStats | None:
        """Checks the folder as `check` does; the stats of the dataset if it is already complete, else None."""
        self.check(config, resume=True, overwrite=False)
        manifest = self.read_manifest()
        if not manifest or not manifest.get("complete"):
            return None
        stats = self.scan(config["num_prompts"], n)
        return stats if len(stats.prompt_indices) == config["num_prompts"] else None

    def open(self, overwrite: bool) -> None:
        """Creates the folder; drops temporary files of a killed run, and with `overwrite` every shard and the
        manifest."""
        self.dir.mkdir(parents=True, exist_ok=True)
        for p in self.dir.iterdir():
            if _TEMP.match(p.name) or (overwrite and (_SHARD.match(p.name) or p.name == MANIFEST)):
                p.unlink()
        shards = self._shards()
        self._next = shards[-1][0] + 1 if shards else 0

    def scan(self, num_prompts: int, n: int) -> DatasetStats:
        """Reads the prompt index, finish reason and reward columns of every shard and checks they fit together."""
        stats = DatasetStats()
        names = ["prompt_index", "finish_reason"] + (["reward"] if self.with_reward else [])
        for _, path in self._shards():
            try:
                table = self._read_columns(path, names)
            except Exception as e:  # a shard written by something else, or edited
                raise OutputDirError(f"{path}: cannot be read ({e}); {_OVERWRITE}") from None
            indices = table.column("prompt_index").to_pylist()
            counts = Counter(indices)
            if dup := sorted(set(counts) & stats.prompt_indices):
                raise OutputDirError(f"{path}: prompt_index {dup[:5]} already in another shard")
            if bad := sorted(i for i, c in counts.items() if c != n or not 0 <= i < num_prompts):
                raise OutputDirError(f"{path}: prompt_index {bad[:5]} out of range or without exactly n={n} rows")
            rewards = table.column("reward").to_pylist() if self.with_reward else None
            stats.add(indices, table.column("finish_reason").to_pylist(), rewards)
        return stats

    def _read_columns(self, path: Path, names: list[str]):
        import pyarrow as pa

        if self.fmt == "parquet":
            import pyarrow.parquet as pq

            return pq.read_table(path, columns=names)
        import pyarrow.json as pj

        schema = pa.schema([self.schema.field(name) for name in names])
        options = pj.ParseOptions(explicit_schema=schema, unexpected_field_behavior="ignore")
        return pj.read_json(path, parse_options=options).select(names)

    def write(self, columns: dict[str, list]) -> Path:
        """Writes one shard atomically; returns its path."""
        path = self.dir / f"train-{self._next:05d}.{self.fmt}"
        self._next += 1
        if self.fmt == "parquet":
            import pyarrow as pa
            import pyarrow.parquet as pq

            table = pa.Table.from_pydict(columns, schema=self.schema)
            _atomic_write(path, lambda f: pq.write_table(table, f))
        else:
            names = list(columns)
            lines = (json.dumps(dict(zip(names, values)), ensure_ascii=False) + "\n"
                     for values in zip(*columns.values()))
            _atomic_write(path, lambda f: f.write("".join(lines).encode()))
        return path
