"""The `rollserve` command line: engine options generated from `EngineConfig` (the same in `serve` and
`generate`), defaults in every `--help`, and `--help` / argument errors without importing torch or transformers."""

import argparse
import subprocess
import sys

import pytest

import rollserve
from rollserve import EngineConfig
from rollserve.cli import build_parser
from rollserve.config import engine_args_from

from helpers import REPO, cli_env

ENGINE_ARGV = ["--dtype", "bf16", "--block-size", "32", "--kv-cache-memory", "512MiB", "--max-num-seqs", "8",
               "--max-num-batched-tokens", "128", "--no-prefix-caching", "--max-model-len", "64", "--seed", "3",
               "--double-buffer-weights", "--attention-backend", "torch", "--no-cuda-graphs"]
ENGINE_ARGS = EngineConfig(dtype="bf16", block_size=32, kv_cache_memory=512 << 20, max_num_seqs=8,
                           max_num_batched_tokens=128, enable_prefix_caching=False, max_model_len=64, seed=3,
                           double_buffer_weights=True, attention_backend="torch", cuda_graphs=False)
REQUIRED = {"generate": ["--model", "m", "--prompts", "p.jsonl", "--out", "o"], "serve": ["--model", "m"]}
HEAVY = ("torch", "transformers")


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    return next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction)).choices


def _engine_options(parser: argparse.ArgumentParser) -> dict[str, tuple]:
    names = {f.name for f in EngineConfig.__dataclass_fields__.values()}
    return {flag: (a.dest, a.default, a.help) for a in parser._actions if a.dest in names for flag in a.option_strings}


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_engine_options_make_the_dataclass(command):
    parser = build_parser()
    assert engine_args_from(parser.parse_args([command, *REQUIRED[command]])) == EngineConfig()
    assert engine_args_from(parser.parse_args([command, *REQUIRED[command], *ENGINE_ARGV])) == ENGINE_ARGS


def test_serve_and_generate_have_the_same_engine_options():
    subcommands = _subcommands()
    generate, serve = (_engine_options(subcommands[c]) for c in ("generate", "serve"))
    assert generate == serve
    assert {"--kv-cache-memory", "--no-prefix-caching", "--double-buffer-weights", "--max-num-seqs",
            "--max-num-batched-tokens", "--max-model-len", "--dtype", "--kv-cache-dtype", "--seed", "--block-size",
            "--attention-backend", "--sampling-backend", "--cuda-graphs", "--no-cuda-graphs"} == set(serve)


def test_standalone_server_parser_matches():
    from rollserve.serve import server

    assert _engine_options(server.build_parser()) == _engine_options(_subcommands()["serve"])
    args = server.build_parser().parse_args([*REQUIRED["serve"], *ENGINE_ARGV])
    assert engine_args_from(args) == ENGINE_ARGS


@pytest.mark.parametrize("argv, message", [
    (["--kv-cache-memory", "2 parsecs"], "argument --kv-cache-memory: kv_cache_memory='2 parsecs' is invalid: "
                                         "must be bytes (an int) or a number and a unit, e.g. '2GiB'"),
    (["--max-num-seqs", "0"], "argument --max-num-seqs: max_num_seqs=0 is invalid: must be an int >= 1"),
    (["--block-size", "many"], "argument --block-size: block_size='many' is invalid: must be an int >= 1"),
    (["--dtype", "float13"], "argument --dtype: dtype='float13' is invalid: must be 'auto', one of"),
    (["--attention-backend", "cuda"], "argument --attention-backend: attention_backend='cuda' is invalid: "
                                      "must be one of 'auto', 'torch', 'triton'"),
])
def test_bad_engine_option_is_an_argument_error(argv, message, capsys):
    for command in ("generate", "serve"):
        with pytest.raises(SystemExit) as info:
            build_parser().parse_args([command, *REQUIRED[command], *argv])
        assert info.value.code == 2 and message in capsys.readouterr().err


def _run(*argv) -> tuple[subprocess.CompletedProcess, set[str]]:
    """`python -X importtime -m rollserve.cli ARGV` -> (result, the top-level packages it imported)."""
    result = subprocess.run([sys.executable, "-X", "importtime", "-m", "rollserve.cli", *argv], cwd=REPO,
                            env=cli_env(), capture_output=True, text=True, timeout=60)
    imported = {line.rpartition("|")[2].strip().partition(".")[0]
                for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result, imported


@pytest.mark.parametrize("argv, code, expected", [
    (["--help"], 0, "generate"),
    (["--version"], 0, f"rollserve {rollserve.__version__}"),
    (["generate", "--help"], 0, "--kv-cache-memory"),
    (["serve", "--help"], 0, "--kv-cache-memory"),
    (["generate", *REQUIRED["generate"], "--kv-cache-memory", "2 parsecs"], 2, "kv_cache_memory='2 parsecs'"),
    (["serve", "--model", "m", "--max-num-seqs", "0"], 2, "max_num_seqs=0 is invalid"),
    (["generate", *REQUIRED["generate"], "--top-p", "2"], 2, "SamplingParams.top_p=2.0 is invalid"),
])
def test_help_and_argument_errors_import_neither_torch_nor_transformers(argv, code, expected):
    result, imported = _run(*argv)
    assert result.returncode == code, result.stderr[-2000:]
    assert expected in result.stdout + result.stderr
    assert "rollserve" in imported and not imported & set(HEAVY), sorted(imported & set(HEAVY))


def test_help_shows_defaults():
    generate, serve = (" ".join(p.format_help().split()) for p in map(_subcommands().get, ("generate", "serve")))
    assert "--max-tokens MAX_TOKENS most tokens per completion (default: 16)" in generate
    assert "--n N completions per prompt (default: 1)" in generate
    for text in (generate, serve):
        assert "(default: 2GiB)" in text and "(default: 256)" in text and "(default: None)" not in text
    assert "--zmq-port ZMQ_PORT ZMQ port for RemoteLLM (0: a free one) (default: 0)" in serve


def test_help_never_shows_the_api_key(monkeypatch):
    monkeypatch.setenv("ROLLSERVE_API_KEY", "secret-key-123")
    serve = _subcommands()["serve"]
    assert serve.parse_args(REQUIRED["serve"]).api_key == "secret-key-123"
    assert "secret-key-123" not in serve.format_help()


def test_serve_byte_limits_are_sizes(capsys):
    serve = _subcommands()["serve"]
    args = serve.parse_args([*REQUIRED["serve"], "--max-update-bytes", "32MiB", "--max-request-bytes", "1048576"])
    assert (args.max_update_bytes, args.max_request_bytes) == (32 << 20, 1 << 20)
    defaults = serve.parse_args(REQUIRED["serve"])
    assert (defaults.max_update_bytes, defaults.max_request_bytes) == (4 << 30, 16 << 20)
    with pytest.raises(SystemExit) as info:
        serve.parse_args([*REQUIRED["serve"], "--max-update-bytes", "lots"])
    assert info.value.code == 2 and "argument --max-update-bytes: 'lots' is not a size" in capsys.readouterr().err
