"""The engine server under load, and RemoteLLM against the in-process LLM.

    python benchmarks/server_load.py [--model PATH] [--dtype fp32] [--clients 64] [--requests 20] [--max-tokens 32]
                                     [--skip-load] [--skip-ratio] [--num-prompts 32] [--ratio-max-tokens 128]
                                     [--kv-cache-memory BYTES]

Defaults: SmolLM2-135M-Instruct (`rollserve.smollm2_135m_instruct()`) and the issue's shape (64 clients x 20
requests; the full GRPO workload). A quick check that it runs: `--clients 4 --requests 2 --max-tokens 8
--num-prompts 2 --ratio-max-tokens 16`. This checkout's `rollserve` is used, in the server process too.

1. `--clients` concurrent streaming HTTP clients (SSE, /v1/chat/completions) each send `--requests`
   requests one after another; prints errors, completion tokens/s, requests/s, and p50/p99 of the
   request latency and of the time to first token.
2. The GRPO workload (benchmarks/workload.py: 32 chat prompts x n=8, T=1, up to 128 tokens) through
   `RemoteLLM.chat` and through an in-process `LLM.chat` on the same model, one after the other
   (the same engine settings; the server idles meanwhile); prints both tokens/s and the ratio RemoteLLM / LLM.
The server runs as a subprocess (`python -m rollserve.serve.server`) on free loopback ports.
"""

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [os.path.dirname(__file__), str(ROOT)]  # this checkout's rollserve, not another installed one
from workload import MAX_NEW_TOKENS, NUM_GENERATIONS, QUESTIONS, TEMPERATURE, conversations  # noqa: E402


def start_server(model: str, dtype: str, *extra: str) -> tuple[subprocess.Popen, dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "rollserve.serve.server", "--model", model, "--dtype", dtype,
                             *extra], env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout:
        if line.startswith("ROLLSERVE READY "):
            return proc, json.loads(line[len("ROLLSERVE READY "):])
    raise RuntimeError("the server exited before it was ready")


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def one_client(client, url: str, k: int, requests: int, max_tokens: int, stats: dict) -> None:
    for j in range(requests):
        body = {"model": "m", "stream": True, "max_tokens": max_tokens, "temperature": 1.0, "seed": k * 1000 + j,
                "messages": [{"role": "user", "content": QUESTIONS[(k + j) % len(QUESTIONS)]}]}
        start, first = time.perf_counter(), None
        try:
            async with client.stream("POST", url, json=body) as resp:
                if resp.status_code != 200:
                    raise RuntimeError(f"HTTP {resp.status_code}: {(await resp.aread())[:200]!r}")
                async for line in resp.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if "error" in chunk:
                        raise RuntimeError(chunk["error"]["message"])
                    for choice in chunk["choices"]:
                        if choice["delta"].get("content") and first is None:
                            first = time.perf_counter()
            stats["latency"].append(time.perf_counter() - start)
            stats["ttft"].append((first or time.perf_counter()) - start)
        except Exception as e:  # noqa: BLE001 - counted and printed
            stats["errors"].append(repr(e))


async def load(http: str, clients: int, requests: int, max_tokens: int) -> dict:
    import httpx2 as httpx

    stats = {"latency": [], "ttft": [], "errors": []}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        await asyncio.gather(*(one_client(client, http + "/v1/chat/completions", k, requests, max_tokens, stats)
                               for k in range(clients)))
    return stats


def run_load(args, info) -> None:
    from rollserve.serve.client import RemoteLLM

    remote = RemoteLLM(info["zmq"], timeout=600)
    tokens0 = remote.stats()["generation_tokens"]
    start = time.perf_counter()
    stats = asyncio.run(load(info["http"], args.clients, args.requests, args.max_tokens))
    elapsed = time.perf_counter() - start
    tokens = remote.stats()["generation_tokens"] - tokens0
    done = len(stats["latency"])
    print(f"[load] {args.clients} streaming clients x {args.requests} requests (max_tokens={args.max_tokens}): "
          f"{done} done, {len(stats['errors'])} errors in {elapsed:.1f} s | {tokens / elapsed:.1f} tok/s, "
          f"{done / elapsed:.2f} req/s | latency p50 {percentile(stats['latency'], 0.5):.2f} s, "
          f"p99 {percentile(stats['latency'], 0.99):.2f} s | first token p50 {percentile(stats['ttft'], 0.5):.2f} s, "
          f"p99 {percentile(stats['ttft'], 0.99):.2f} s", flush=True)
    for e in stats["errors"][:5]:
        print("  error:", e)
    remote.close()


def run_ratio(args, info) -> None:
    from rollserve import LLM, SamplingParams
    from rollserve.serve.client import RemoteLLM

    convs = conversations(args.num_prompts)
    params = SamplingParams(n=NUM_GENERATIONS, temperature=TEMPERATURE, max_tokens=args.ratio_max_tokens, logprobs=0)
    warm = SamplingParams(max_tokens=8)

    def timed(engine) -> tuple[float, int]:
        engine.chat(convs[:2], warm, use_tqdm=False)
        engine.reset_prefix_cache()
        start = time.perf_counter()
        outs = engine.chat(convs, params, use_tqdm=False)
        tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
        return tokens / (time.perf_counter() - start), tokens

    remote = RemoteLLM(info["zmq"], timeout=600)
    remote_rate, remote_tokens = timed(remote)
    remote.close()
    kwargs = {} if args.kv_cache_memory is None else {"kv_cache_memory": args.kv_cache_memory}
    llm = LLM(args.model, dtype=args.dtype, seed=0, **kwargs)
    local_rate, local_tokens = timed(llm)
    print(f"[ratio] GRPO workload ({len(convs)} prompts x n={NUM_GENERATIONS}, max_tokens={args.ratio_max_tokens}, "
          f"{args.dtype}): RemoteLLM {remote_rate:.1f} tok/s ({remote_tokens} tokens) | in-process LLM "
          f"{local_rate:.1f} tok/s ({local_tokens} tokens) | ratio {remote_rate / local_rate:.3f}", flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None, help="default: SmolLM2-135M-Instruct")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--clients", type=int, default=64)
    ap.add_argument("--requests", type=int, default=20)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--ratio-max-tokens", type=int, default=MAX_NEW_TOKENS)
    ap.add_argument("--kv-cache-memory", type=int, default=None, help="bytes, for the server and the in-process LLM")
    ap.add_argument("--skip-load", action="store_true")
    ap.add_argument("--skip-ratio", action="store_true")
    args = ap.parse_args()
    if args.model is None:
        from rollserve import smollm2_135m_instruct

        args.model = str(smollm2_135m_instruct())
    for field in ("clients", "requests", "max_tokens", "num_prompts", "ratio_max_tokens"):
        if getattr(args, field) < 1:
            ap.error(f"--{field.replace('_', '-')} must be >= 1, got {getattr(args, field)}")
    extra = () if args.kv_cache_memory is None else ("--kv-cache-memory", str(args.kv_cache_memory))
    proc, info = start_server(args.model, args.dtype, "--seed", "0", *extra)
    try:
        if not args.skip_load:
            run_load(args, info)
        if not args.skip_ratio:
            run_ratio(args, info)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)


if __name__ == "__main__":
    main()
