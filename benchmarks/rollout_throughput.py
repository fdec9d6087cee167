"""Rollout throughput: rollserve vs peer engines on the same workload, in one invocation.

    python benchmarks/rollout_throughput.py [--peers vllm,hf-cb,hf] [--long] [--dtype fp32 bf16]
                                            [--num-prompts N] [--sampling plain controls]
                                            [--kv-cache-dtype auto fp16]
                                            [--peer-timeout 1800] [--hf-batch 4]

The workload (benchmarks/workload.py) is GRPO-shaped by default: 32 chat
prompts x n=8, T=1, 128 new tokens with ignore_eos; `--long` is 16 prompts x
n=4 x 1024 tokens. rollserve runs in this process; each peer runs in its own
process (benchmarks/peer.py) under `--peer-timeout`: one that does not finish
in time is reported as such, not as a crash. vLLM's CPU build runs in its own
venv, made on first use (benchmarks/vllm_venv.py). Both rollserve and vLLM get
a KV cache of KV_CACHE_GIB (4 GiB), which holds the --long workload whole in
fp32; rollserve's line counts its preemptions.

Prints completion tokens/s for each engine and its ratio to rollserve, the
GEMM-only ceiling (benchmarks/gemm_ceiling.py: the model's linear layers for
one decode step at the batch rows the engine ran, through the engine's GEMMs,
and through plain `F.linear` for comparison) and the fraction of the first
each engine reached, and where rollserve's time went: the forward pass, the
sampler (with building its per-row tensors) and the rest of the step (packing
the batch, postprocess). "plain" sampling is the GRPO setting (T=1,
sampled-token logprobs); "controls" adds top_p=0.95, top_k=50 and logprobs=5
(rollserve only).
"""

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict

import torch

sys.path.insert(0, os.path.dirname(__file__))
import vllm_venv  # noqa: E402
from gemm_ceiling import gemm_step_seconds  # noqa: E402
from workload import GRPO, LONG, Workload, conversations  # noqa: E402

import rollserve.engine.llm_engine as llm_engine  # noqa: E402
from rollserve import LLM, SamplingParams, smollm2_135m_instruct  # noqa: E402

SAMPLING = {
    "plain": dict(logprobs=0),
    "controls": dict(top_p=0.95, top_k=50, logprobs=5),
}
PEERS = ("vllm", "hf-cb", "hf")
MAX_NUM_SEQS = 256
# the KV cache of both rollserve and vLLM: the --long workload (64 x ~1,065 tokens, 3.1 GB in fp32) fits in it
KV_CACHE_GIB = 4
VLLM_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0-1", "VLLM_CPU_NUM_OF_RESERVED_CPU": "0",
            "VLLM_CPU_KVCACHE_SPACE": str(KV_CACHE_GIB)}


class _Timed:
    """Wraps a callable and adds up the seconds spent in it."""

    def __init__(self, fn):
        self.fn, self.seconds = fn, 0.0

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        try:
            return self.fn(*args, **kwargs)
        finally:
            self.seconds += time.perf_counter() - start


def run_rollserve(llm: LLM, w: Workload, sampling: str) -> tuple[float, int, dict, int]:
    """Returns (tokens/s, tokens, {part: share of the run}, preemptions) for one timed `chat` call."""
    params = SamplingParams(n=w.n, temperature=w.temperature, max_tokens=w.max_tokens, ignore_eos=w.ignore_eos,
                            **SAMPLING[sampling])
    llm.chat(conversations(2), SamplingParams(max_tokens=8), use_tqdm=False)  # warm-up
    llm.reset_prefix_cache()
    engine, runner = llm.engine, llm.engine.runner
    sampler, batch_cls, forward = _Timed(engine.sampler), _Timed(llm_engine.SamplingBatch), _Timed(runner.forward)
    step = _Timed(engine.step)
    engine.sampler, llm_engine.SamplingBatch, runner.forward, engine.step = sampler, batch_cls, forward, step
    preempted = llm.metrics()["num_preemptions"]
    try:
        start = time.perf_counter()
        outs = llm.chat(conversations(w.num_prompts), params, use_tqdm=False)
        elapsed = time.perf_counter() - start
    finally:
        del runner.forward, engine.step  # back to the class's methods
        engine.sampler, llm_engine.SamplingBatch = sampler.fn, batch_cls.fn
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    sampling_s = sampler.seconds + batch_cls.seconds
    shares = {"forward": forward.seconds, "sampler": sampling_s, "rest of step": step.seconds - forward.seconds
              - sampling_s, "outside steps": elapsed - step.seconds}
    preempted = llm.metrics()["num_preemptions"] - preempted
    return tokens / elapsed, tokens, {k: v / elapsed for k, v in shares.items()}, preempted


def run_peer(engine: str, model: str, dtype: str, w: Workload, timeout: float, hf_batch: int) -> dict:
    """Runs benchmarks/peer.py ENGINE in its own process group; returns its RESULT, or {"error": ...}."""
    python, env = sys.executable, dict(os.environ)
    if engine == "vllm":
        python = str(vllm_venv.ensure())
        env.update(VLLM_ENV)
        env.pop("PYTHONPATH", None)
    cmd = [python, os.path.join(os.path.dirname(__file__), "peer.py"), engine, "--model", model, "--dtype", dtype,
           "--workload", json.dumps(asdict(w)), "--hf-batch", str(hf_batch)]
    with tempfile.NamedTemporaryFile("w+", prefix=f"peer-{engine}-", suffix=".log", delete=False) as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)  # vLLM leaves an engine-core child: end the whole group
            proc.wait()
            return {"error": f"> {timeout:.0f} s, did not finish (log: {log.name})"}
        log.seek(0)
        lines = log.read().splitlines()
    results = [json.loads(line[len("RESULT "):]) for line in lines if line.startswith("RESULT ")]
    if rc != 0 or not results:
        why = " (SIGKILL: out of memory?)" if rc == -signal.SIGKILL else ""
        return {"error": f"exited with {rc}{why} (log: {log.name}): {lines[-1] if lines else ''}"}
    os.unlink(log.name)
    return results[-1]


def _load() -> str:
    return "load average " + " ".join(f"{x:.2f}" for x in os.getloadavg())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--peers", default="", help=f"comma-separated, from {','.join(PEERS)}")
    ap.add_argument("--long", action="store_true", help=f"the long workload: {LONG.describe()}")
    ap.add_argument("--dtype", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    ap.add_argument("--num-prompts", type=int, default=None, help="fewer prompts than the workload's")
    ap.add_argument("--sampling", nargs="+", default=["plain"], choices=sorted(SAMPLING))
    ap.add_argument("--kv-cache-dtype", nargs="+", default=["auto"], choices=["auto", "bf16", "fp16"],
                    help="rollserve's KV cache dtype, one rollserve run each (bf16/fp16: a 16-bit cache under "
                         "fp32 weights, EngineConfig.kv_cache_dtype; the peers keep the model's dtype)")
    ap.add_argument("--peer-timeout", type=float, default=1800.0, help="seconds, per peer run, loading included")
    ap.add_argument("--hf-batch", type=int, default=4, help="prompts per model.generate call (hf)")
    args = ap.parse_args()
    peers = [p for p in args.peers.split(",") if p]
    unknown = set(peers) - set(PEERS)
    if unknown:
        ap.error(f"--peers: unknown {sorted(unknown)}; choose from {','.join(PEERS)}")
    w = LONG if args.long else GRPO
    if args.num_prompts:
        w = Workload(w.name, args.num_prompts, w.n, w.max_tokens, w.temperature, w.ignore_eos)
    path = str(smollm2_135m_instruct())
    rows = min(w.num_seqs, MAX_NUM_SEQS)
    print(f"workload {w.describe()}; torch threads={torch.get_num_threads()}; {_load()}", flush=True)
    for dtype in args.dtype:
        results = {}
        for kv in args.kv_cache_dtype:
            if kv != "auto" and dtype != "fp32":
                continue  # a 16-bit cache is an option of fp32 weights only
            llm = LLM(path, dtype=dtype, kv_cache_dtype=kv, seed=0, max_num_seqs=MAX_NUM_SEQS,
                      kv_cache_memory=f"{KV_CACHE_GIB}GiB")
            for sampling in args.sampling:
                tps, tokens, shares, preempted = run_rollserve(llm, w, sampling)
                name = "rollserve" + (f" ({sampling})" if sampling != "plain" else "") + (
                    f" (kv {kv})" if kv != "auto" else "")
                results[name] = {"tokens": tokens, "seconds": tokens / tps}
                print(f"[{dtype}] {name}: {tps:7.1f} tok/s ({tokens} tokens); "
                      + ", ".join(f"{k} {100 * v:4.1f}%" for k, v in shares.items())
                      + f"; {preempted} preemptions; {_load()}", flush=True)
            if kv == args.kv_cache_dtype[0]:  # the same weights and GEMMs whatever the cache: measured once
                step_s = gemm_step_seconds(llm.model, rows, mode=llm.engine.runner._gemm)
                plain_s = gemm_step_seconds(llm.model, rows)
            del llm
        for peer in peers:
            results[peer] = run_peer(peer, path, dtype, w, args.peer_timeout, args.hf_batch)
            print(f"[{dtype}] {peer}: {_describe(results[peer])}; {_load()}", flush=True)
        ceiling = rows / step_s
        print(f"[{dtype}] GEMM-only ceiling at {rows} rows, the engine's GEMMs: {1000 * step_s:.0f} ms per step = "
              f"{ceiling:.1f} tok/s (plain F.linear: {1000 * plain_s:.0f} ms = {rows / plain_s:.1f} tok/s)")
        _summary(dtype, results, ceiling)


def _describe(r: dict) -> str:
    if "error" in r:
        return r["error"]
    return f"{r['tokens'] / r['seconds']:7.1f} tok/s ({r['tokens']} tokens in {r['seconds']:.1f} s)"


def _summary(dtype: str, results: dict, ceiling: float) -> None:
    base = results["rollserve"]["tokens"] / results["rollserve"]["seconds"] if "rollserve" in results else None
    print(f"[{dtype}] {'engine':<22} {'tok/s':>8} {'rollserve/x':>12} {'of ceiling':>11}")
    for name, r in results.items():
        if "error" in r:
            print(f"[{dtype}] {name:<22} {'-':>8} {'-':>12} {'-':>11}  {r['error']}")
            continue
        tps = r["tokens"] / r["seconds"]
        ratio = f"{base / tps:11.2f}x" if base else "-"
        print(f"[{dtype}] {name:<22} {tps:8.1f} {ratio:>12} {100 * tps / ceiling:10.1f}%")
    for name, r in results.items():  # the other rollserve runs (a 16-bit KV cache, other sampling) to each peer
        if name == "rollserve" or not name.startswith("rollserve") or "error" in r:
            continue
        for peer, p in results.items():
            if not peer.startswith("rollserve") and "error" not in p:
                ratio = (r["tokens"] / r["seconds"]) / (p["tokens"] / p["seconds"])
                print(f"[{dtype}] {name} / {peer}: {ratio:.2f}x")


if __name__ == "__main__":
    main()
