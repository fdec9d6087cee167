"""A 2-replica RolloutCluster (1 torch thread each) vs one LLM with 2 threads, same machine, runs interleaved.

    python benchmarks/cluster.py [--num-prompts 32] [--max-tokens 128] [--repeats 2] [--dtype fp32] [--weights-only]

Three figures, each next to its peer measured in the same run:
- GRPO workload (workload.py: chat prompts x 8 samples, T=1.0): completion tokens/s of the cluster and of
  the single engine, and their ratio (near 1.0 on a 2-core CPU: the point is what Ray and the router add);
- routing and result transfer per request: `--overhead-requests` one-token requests through the cluster
  vs through one 1-thread LLM, the difference per request;
- a full weight update to both replicas (stage on both, commit on both), through the object store and
  through a gloo broadcast group (weight_transport="distributed"), vs one in-process `LLM.update_weights`.
Needs `rollserve[ray]`; starts a local Ray instance with 2 CPUs.
"""

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from workload import NUM_GENERATIONS, TEMPERATURE, conversations  # noqa: E402

from rollserve import LLM, SamplingParams, smollm2_135m_instruct  # noqa: E402
from rollserve.cluster import RolloutCluster  # noqa: E402


def timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


def completion_tokens(outputs) -> int:
    return sum(len(c.token_ids) for o in outputs for c in o.outputs)


def throughput(cluster, single, args) -> None:
    convs = conversations(args.num_prompts)
    warm = SamplingParams(max_tokens=8)
    single.chat(convs[:2], warm, use_tqdm=False)
    cluster.chat(convs[:2], warm)
    print(f"workload: {len(convs)} prompts x n={NUM_GENERATIONS}, T={TEMPERATURE}, max_tokens={args.max_tokens}, "
          f"{args.dtype}; cluster: 2 replicas x 1 thread; single: 1 LLM x {torch.get_num_threads()} threads",
          flush=True)
    totals = {"cluster": [0, 0.0], "single": [0, 0.0]}
    for r in range(args.repeats):
        params = SamplingParams(n=NUM_GENERATIONS, temperature=TEMPERATURE, max_tokens=args.max_tokens, logprobs=0,
                                seed=r)
        for name in ("cluster", "single") if r % 2 == 0 else ("single", "cluster"):
            engine = cluster if name == "cluster" else single
            engine.reset_prefix_cache()
            outs, elapsed = timed(engine.chat, convs, params, False)
            totals[name][0] += completion_tokens(outs)
            totals[name][1] += elapsed
            print(f"  run {r} {name:7s}: {completion_tokens(outs) / elapsed:7.1f} tok/s ({elapsed:.1f} s)", flush=True)
    rate = {name: tokens / elapsed for name, (tokens, elapsed) in totals.items()}
    print(f"cluster {rate['cluster']:.1f} tok/s | single {rate['single']:.1f} tok/s | "
          f"ratio {rate['cluster'] / rate['single']:.3f}")


def overhead(cluster, single, args) -> None:
    torch.set_num_threads(1)  # the per-request cost of one replica's engine, without Ray and the router
    prompts = [[1 + i % 100, 2, 3, 4] for i in range(args.overhead_requests)]
    one = SamplingParams(max_tokens=1)
    _, local = timed(single.generate, prompts, one, False)
    _, remote = timed(cluster.generate, prompts, one)
    print(f"routing + transfer: {(remote - local) / len(prompts) * 1e3:.2f} ms/request "
          f"(cluster {remote * 1e3:.0f} ms vs one LLM {local * 1e3:.0f} ms for {len(prompts)} one-token requests)")


def weights(cluster, single, model: str, args) -> None:
    """The object store, then a gloo group (a second cluster: the first update builds the group), vs in-process."""
    named = [(n, p.detach().clone()) for n, p in single.model.named_parameters()]
    size = sum(t.numel() * t.element_size() for _, t in named) / 2**20
    _, store = timed(cluster.update_weights, named)
    _, in_process = timed(single.update_weights, named)
    cluster.shutdown()
    group = RolloutCluster(model, 2, {"num_cpus": 1}, dtype=args.dtype, seed=0, weight_transport="distributed")
    _, first = timed(group.update_weights, named)
    _, again = timed(group.update_weights, named)
    group.shutdown()
    print(f"weight update ({size:.0f} MiB) to 2 replicas: object store {store:.2f} s | gloo group {again:.2f} s "
          f"({first:.2f} s the first time, which builds the group) | in-process {in_process:.2f} s | "
          f"ratios {store / in_process:.1f}, {again / in_process:.1f}")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2, help="runs of each, interleaved")
    ap.add_argument("--overhead-requests", type=int, default=64)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--weights-only", action="store_true", help="only the weight-update figures")
    args = ap.parse_args()
    import ray

    model = str(smollm2_135m_instruct())
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    torch.set_num_threads(2)
    single = LLM(model, dtype=args.dtype, seed=0)
    cluster = RolloutCluster(model, 2, {"num_cpus": 1}, dtype=args.dtype, seed=0)
    if not args.weights_only:
        throughput(cluster, single, args)
        overhead(cluster, single, args)
    weights(cluster, single, model, args)


if __name__ == "__main__":
    main()
