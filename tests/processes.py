"""Helpers for tests that run real worker processes (torch.distributed ranks on loopback)."""

import socket
import subprocess
import sys
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ranks(worker: Path, world_size: int, args: list[str], timeout: float) -> list[str]:
    """Runs `python worker RANK WORLD_SIZE PORT *args` for every rank; returns their outputs.

    Fails (with the tail of that rank's output) if any rank exits with a non-zero status.
    """
    port = str(free_port())
    procs = [subprocess.Popen([sys.executable, str(worker), str(rank), str(world_size), port, *args],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in range(world_size)]
    try:
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    finally:
        for p in procs:
            p.kill()
    for rank, (p, out) in enumerate(zip(procs, outs)):
        assert p.returncode == 0, f"rank {rank} exited with {p.returncode}:\n{out[-6000:]}"
    return outs
