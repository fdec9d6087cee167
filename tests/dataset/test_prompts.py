"""Prompt sources: JSONL, Parquet and save_to_disk folders are read; every bad input raises an error naming
the file and line (or row) and writes nothing; so does every invalid configuration."""

import json

import datasets
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rollserve import LLM, SamplingParams
from rollserve.dataset import PromptFileError, generate_dataset, read_prompts

from helpers import one_thread, run_cli, tiny_model_dir  # noqa: F401 (fixtures)

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


def _jsonl(path, *lines) -> str:
    path.write_bytes(b"".join((line if isinstance(line, bytes) else json.dumps(line).encode()) + b"\n"
                              for line in lines))
    return str(path)


def test_sources_are_read_with_their_extra_fields(tmp_path):
    jsonl = _jsonl(tmp_path / "p.jsonl", "plain", {"prompt": CHAT, "answer": 4}, b"   ", {"prompt": "x", "id": 7})
    rows = read_prompts(jsonl).rows
    assert [r.prompt for r in rows] == ["plain", CHAT, "x"] and [r.extra for r in rows] == [{}, {"answer": 4}, {"id": 7}]
    assert [r.where for r in rows] == [f"{jsonl}:1", f"{jsonl}:2", f"{jsonl}:4"] and rows[1].is_chat

    pq.write_table(pa.table({"question": ["a", "b"], "answer": [1, 2]}), tmp_path / "p.parquet")
    rows = read_prompts(tmp_path / "p.parquet", prompt_field="question").rows
    assert [(r.prompt, r.extra) for r in rows] == [("a", {"answer": 1}), ("b", {"answer": 2})]

    datasets.Dataset.from_dict({"prompt": [CHAT, CHAT[1:]]}).save_to_disk(str(tmp_path / "saved"))
    saved = read_prompts(tmp_path / "saved")
    assert [r.prompt for r in saved.rows] == [CHAT, CHAT[1:]]
    assert saved.fingerprint == read_prompts([{"prompt": CHAT}, {"prompt": CHAT[1:]}]).fingerprint


BAD_JSONL = {
    "missing field": ([{"prompt": "ok"}, {"question": "where?"}], r"bad.jsonl:2: no field 'prompt' \(fields: question\)"),
    "empty file": ([], r"bad.jsonl: no prompts \(empty\)"),
    "blank lines only": ([b"", b"  "], r"bad.jsonl: no prompts \(empty\)"),
    "non-UTF-8 line": (["ok", "ok", b'{"prompt": "caf\xe9"}'], r"bad.jsonl:3: not valid UTF-8 \(byte 15\)"),
    "invalid JSON": (["ok", b'{"prompt": '], r"bad.jsonl:2: invalid JSON"),
    "number row": (["ok", 42], r"bad.jsonl:2: the prompt must be a string or a list of chat messages, got int"),
    "mapping prompt": ([{"prompt": {"text": "hi"}}], r"bad.jsonl:1: the prompt must be .* got dict"),
    "empty prompt": ([""], r"bad.jsonl:1: the prompt is an empty string"),
    "message without role": ([[{"content": "hi"}]], r"bad.jsonl:1: message 0 has no 'role'"),
    "message not a mapping": ([["hi"]], r"bad.jsonl:1: message 0 must be a mapping .* got str"),
    "empty message list": ([{"prompt": []}], r"bad.jsonl:1: the message list is empty"),
}


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return LLM(tiny_model_dir)


@pytest.mark.parametrize("case", list(BAD_JSONL))
def test_bad_jsonl_names_file_and_line_and_writes_nothing(tiny, tmp_path, case):
    lines, message = BAD_JSONL[case]
    path = _jsonl(tmp_path / "bad.jsonl", *lines)
    with pytest.raises(PromptFileError, match=message):
        generate_dataset(tiny, path, SamplingParams(max_tokens=2), tmp_path / "out", use_tqdm=False)
    assert not (tmp_path / "out").exists()


def test_bad_parquet_and_saved_datasets(tiny, tmp_path):
    pq.write_table(pa.table({"text": ["a"]}), tmp_path / "cols.parquet")
    pq.write_table(pa.table({"prompt": ["a", None]}), tmp_path / "null.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    (tmp_path / "p.csv").write_text("prompt\na\n")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"prompt": ["a"]})}).save_to_disk(str(tmp_path / "dd"))
    cases = {
        "cols.parquet": r"cols.parquet: no column 'prompt' \(columns: text\)",
        "null.parquet": r"null.parquet row 1: the prompt must be a string or a list of chat messages, got NoneType",
        "junk.parquet": r"junk.parquet: not a readable Parquet file",
        "p.csv": r"p.csv: unsupported prompt file type '.csv'",
        "dd": r"dd: holds the splits train; pass one split's folder",
    }
    for name, message in cases.items():
        with pytest.raises(PromptFileError, match=message):
            generate_dataset(tiny, tmp_path / name, SamplingParams(max_tokens=2), tmp_path / "out", use_tqdm=False)
    with pytest.raises(FileNotFoundError, match="prompt file not found"):
        generate_dataset(tiny, tmp_path / "nope.jsonl", SamplingParams(max_tokens=2), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_prompts_that_cannot_run_name_their_line(tiny, tmp_path):
    path = _jsonl(tmp_path / "p.jsonl", "short", "word " * 400)
    with pytest.raises(PromptFileError, match=r"p.jsonl:2: the prompt has \d+ tokens; the model's context is 256"):
        generate_dataset(tiny, path, SamplingParams(max_tokens=2), tmp_path / "out", use_tqdm=False)
    clash = _jsonl(tmp_path / "clash.jsonl", {"prompt": "a", "completion": "b"})
    with pytest.raises(PromptFileError, match=r"clash.jsonl:1: field 'completion' would clash"):
        generate_dataset(tiny, clash, SamplingParams(max_tokens=2), tmp_path / "out", lambda p, c, **k: 0.0)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(batch_size=0), ValueError, r"batch_size=0 is invalid"),
    (dict(output_format="csv"), ValueError, r"format='csv' is invalid: must be one of parquet, jsonl"),
    (dict(reward_fn="exact_match"), TypeError, r"reward_fn must be callable"),
    (dict(sampling_params={"n": 2}), TypeError, r"sampling_params must be a SamplingParams, got dict"),
    (dict(sampling_params=SamplingParams(prompt_logprobs=1)), ValueError, r"prompt_logprobs is not stored"),
    (dict(prompt_field=""), ValueError, r"prompt_field='' is invalid"),
])
def test_invalid_configuration_writes_nothing(tiny, tmp_path, kwargs, error, message):
    path = _jsonl(tmp_path / "p.jsonl", "hello")
    kwargs = {"sampling_params": SamplingParams(max_tokens=2), **kwargs}
    with pytest.raises(error, match=message):
        generate_dataset(tiny, path, output_dir=tmp_path / "out", use_tqdm=False, **kwargs)
    assert not (tmp_path / "out").exists()


def test_cli_reports_bad_input_and_writes_nothing(tmp_path, tiny_model_dir, run_cli):
    path = _jsonl(tmp_path / "bad.jsonl", "ok", {"question": "where?"})
    result = run_cli("--model", tiny_model_dir, "--prompts", path, "--out", tmp_path / "out")
    assert result.returncode == 2
    assert f"rollserve generate: error: {path}:2: no field 'prompt' (fields: question)" in result.stderr
    bad_reward = run_cli("--model", tiny_model_dir, "--prompts", tmp_path / "p.jsonl", "--out", tmp_path / "out",
                         "--reward", "no_such_module_xyz:f")
    assert bad_reward.returncode == 2 and "cannot import 'no_such_module_xyz'" in bad_reward.stderr
    assert not (tmp_path / "out").exists()
