"""Reading prompt sets: JSONL, Parquet, a `datasets.save_to_disk` folder, or rows in memory.

Each row is a string prompt, a list of chat messages, or a mapping holding one
of those under the prompt field; the mapping's other fields travel with the
prompt (they are passed to the reward function). Every error names the file
and the line (JSONL, 1-based) or row (Parquet and datasets, 0-based).
"""

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path


class PromptFileError(ValueError):
    """A prompt source that cannot be used; the message names the file and the line or row."""


@dataclass(frozen=True)
class PromptRow:
    prompt: str | list[dict]  # as given: a string or a list of chat messages
    extra: dict  # the row's other fields
    where: str  # "file.jsonl:12", "file.parquet row 3", "prompts[3]"

    @property
    def is_chat(self) -> bool:
        return not isinstance(self.prompt, str)


@dataclass
class PromptSet:
    """The rows of a prompt source and a fingerprint of their content (sha256 over canonical JSON)."""

    rows: list[PromptRow]
    source: str
    fingerprint: str = field(default="")

    def __post_init__(self) -> None:
        if not self.fingerprint:
            digest = hashlib.sha256()
            for row in self.rows:
                digest.update(json.dumps([row.prompt, row.extra], sort_keys=True, default=str).encode())
                digest.update(b"\n")
            self.fingerprint = digest.hexdigest()

    def __len__(self) -> int:
        return len(self.rows)


def _check_messages(value, where: str) -> None:
    if not value:
        raise PromptFileError(f"{where}: the message list is empty")
    for k, message in enumerate(value):
        if not isinstance(message, dict):
            raise PromptFileError(f"{where}: message {k} must be a mapping with 'role' and 'content', "
                                  f"got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message or message[key] is None:
                raise PromptFileError(f"{where}: message {k} has no {key!r}")
        if not isinstance(message["role"], str):
            raise PromptFileError(f"{where}: message {k} 'role' must be a string, got {type(message['role']).__name__}")


def _to_row(value, prompt_field: str, where: str) -> PromptRow:
    extra = {}
    if isinstance(value, dict):
        if prompt_field not in value:
            raise PromptFileError(f"{where}: no field {prompt_field!r} (fields: {', '.join(map(str, value)) or 'none'})")
        extra = {k: v for k, v in value.items() if k != prompt_field}
        value = value[prompt_field]
    if isinstance(value, str):
        if not value:
            raise PromptFileError(f"{where}: the prompt is an empty string")
        return PromptRow(value, extra, where)
    if isinstance(value, (list, tuple)):
        _check_messages(value, where)
        return PromptRow(list(value), extra, where)
    raise PromptFileError(f"{where}: the prompt must be a string or a list of chat messages, got {type(value).__name__}")


def _read_jsonl(path: Path, prompt_field: str) -> list[PromptRow]:
    rows = []
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            where = f"{path}:{number}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise PromptFileError(f"{where}: not valid UTF-8 (byte {e.start})") from None
            if not line.strip():
                continue
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise PromptFileError(f"{where}: invalid JSON: {e.msg} (column {e.colno})") from None
            rows.append(_to_row(value, prompt_field, where))
    return rows


def _read_parquet(path: Path, prompt_field: str) -> list[PromptRow]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises several types for a damaged or foreign file
        raise PromptFileError(f"{path}: not a readable Parquet file ({e})") from None
    if prompt_field not in table.column_names:
        raise PromptFileError(f"{path}: no column {prompt_field!r} (columns: {', '.join(table.column_names)})")
    return [_to_row(value, prompt_field, f"{path} row {i}") for i, value in enumerate(table.to_pylist())]


def _read_saved_dataset(path: Path, prompt_field: str) -> list[PromptRow]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(path))
    except FileNotFoundError as e:
        raise PromptFileError(f"{path}: not a folder written by datasets' save_to_disk ({e})") from None
    if isinstance(ds, datasets.DatasetDict):
        raise PromptFileError(f"{path}: holds the splits {', '.join(ds)}; pass one split's folder, e.g. {path / next(iter(ds))}")
    if prompt_field not in ds.column_names:
        raise PromptFileError(f"{path}: no column {prompt_field!r} (columns: {', '.join(ds.column_names)})")
    return [_to_row(value, prompt_field, f"{path} row {i}") for i, value in enumerate(ds)]


def read_prompts(source, prompt_field: str = "prompt") -> PromptSet:
    """Reads a prompt source: a `.jsonl` or `.parquet` file, a `save_to_disk` folder, a `datasets.Dataset`,
    or a list of rows (strings, message lists, or mappings with `prompt_field`).

    Raises `PromptFileError` (a `ValueError`) naming the file and line or row of the first bad row,
    or when the source holds no prompt.
    """
    if not isinstance(prompt_field, str) or not prompt_field:
        raise ValueError(f"prompt_field={prompt_field!r} is invalid: must be a non-empty string")
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            rows = _read_saved_dataset(path, prompt_field)
        elif not path.is_file():
            raise FileNotFoundError(f"prompt file not found: {path}")
        elif path.suffix == ".jsonl":
            rows = _read_jsonl(path, prompt_field)
        elif path.suffix == ".parquet":
            rows = _read_parquet(path, prompt_field)
        else:
            raise PromptFileError(f"{path}: unsupported prompt file type {path.suffix!r}: use .jsonl, .parquet "
                                  f"or a folder written by datasets' save_to_disk")
        label = str(path)
    elif isinstance(source, (list, tuple)):
        rows = [_to_row(value, prompt_field, f"prompts[{i}]") for i, value in enumerate(source)]
        label = f"<{len(rows)} prompts in memory>"
    elif type(source).__name__ == "Dataset" and hasattr(source, "column_names"):
        rows = [_to_row(value, prompt_field, f"dataset row {i}") for i, value in enumerate(source)]
        label = f"<datasets.Dataset of {len(rows)} rows>"
    else:
        raise TypeError(f"prompts must be a path, a list of rows or a datasets.Dataset, got {type(source).__name__}")
    if not rows:
        raise PromptFileError(f"{label}: no prompts (empty)")
    return PromptSet(rows, label)
