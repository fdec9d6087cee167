"""`rollserve serve` start-up as a user meets it: a failure is one line on stderr and a non-zero exit
(no traceback unless `--log-level debug`); `--no-access-log` silences the per-request lines.

Real server processes on loopback, with the tiny model folder of test_server.py.
"""

import os
import signal
import socket
import subprocess
import sys

import pytest
from test_server import API_KEY, KV_BYTES, ROOT, Server, tiny_folder  # noqa: F401 (fixture)


def _serve(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "rollserve.serve.server", "--kv-cache-memory", str(KV_BYTES), *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def _one_error_line(result: subprocess.CompletedProcess) -> str:
    """The failure's message, after checking it came as one stderr line, with no traceback and no READY."""
    assert result.returncode != 0, result.stdout + result.stderr
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    assert "ROLLSERVE READY" not in result.stdout
    [line] = [line for line in result.stderr.splitlines() if line.startswith("rollserve serve: error: ")]
    return line


def test_bad_model_path_is_one_line(tmp_path):
    missing = tmp_path / "no-such-model"
    expected = f"rollserve serve: error: --model {missing}: no such file or folder"
    assert _one_error_line(_serve("--model", str(missing))) == expected
    empty = tmp_path / "empty"
    empty.mkdir()
    assert "neither a .gguf file nor a folder with a config.json" in _one_error_line(_serve("--model", str(empty)))


def test_log_level_debug_keeps_the_traceback(tmp_path):
    result = _serve("--model", str(tmp_path / "no-such-model"), "--log-level", "debug")
    assert result.returncode != 0 and "Traceback" in result.stderr and "no such file or folder" in result.stderr


@pytest.mark.parametrize("flag", ["--http-port", "--zmq-port"])
def test_port_in_use_is_one_line(tiny_folder, flag):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = _one_error_line(_serve("--model", tiny_folder, flag, str(port)))
    assert str(port) in line and "Address already in use" in line


def test_bad_flag_is_an_argument_error(tiny_folder):
    result = _serve("--model", tiny_folder, "--max-num-seqs", "zero")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "argument --max-num-seqs: max_num_seqs='zero' is invalid" in result.stderr


def test_no_access_log(tiny_folder):
    import httpx2 as httpx

    server = Server(tiny_folder, "--no-access-log", "--api-key", API_KEY)
    try:
        r = httpx.post(server.info["http"] + "/v1/completions", json={"prompt": "Hello", "max_tokens": 2},
                       headers={"Authorization": f"Bearer {API_KEY}"})
        assert r.status_code == 200 and httpx.get(server.info["http"] + "/health").status_code == 200
    finally:
        assert server.stop(signal.SIGTERM) == 0, "".join(server.log)
    assert any("server stopped" in line for line in server.log)
    assert not any("rollserve.access" in line for line in server.log), "".join(server.log)
