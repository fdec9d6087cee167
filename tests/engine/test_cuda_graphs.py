"""Decode steps as CUDA graphs (`engine/cuda_graphs.py`).

On the CPU: when graphs are used, the batch sizes and padding, when a step must capture again (the
data addresses of real weights through real in-place and double-buffered updates), and that padding
rows on the scratch block give the eager step's logits without touching a sequence's KV. The tests
marked `cuda` need a GPU (skipped without one; `benchmarks/gpu_check.sh` runs them): greedy output
with graphs equals eager, and weight updates between steps reach the next replayed step.
"""

import pytest
import torch

from rollserve import LLM, SamplingParams
from rollserve.config import EngineConfig
from rollserve.engine.cuda_graphs import (DecodeGraphs, GraphCache, StaticDecodeInputs, capture_sizes, data_addresses,
                                          padded_size, use_cuda_graphs)
from rollserve.engine.kv_cache import PagedKVCache
from rollserve.weight_sync.updater import WeightBuffers

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def test_graphs_only_on_cuda_with_the_triton_kernels():
    assert use_cuda_graphs(None, "cuda:0", "triton")
    assert not use_cuda_graphs(None, "cuda", "torch")
    assert not use_cuda_graphs(None, "cpu", "cpu") and not use_cuda_graphs(None, "cpu", "torch")
    assert not use_cuda_graphs(False, "cuda", "triton")
    assert use_cuda_graphs(True, "cuda", "triton")
    with pytest.raises(ValueError, match=r"cuda_graphs=True needs the model on a CUDA device \(it is on cpu\)"):
        use_cuda_graphs(True, "cpu", "torch")
    with pytest.raises(ValueError, match="needs the Triton attention kernels .* the 'torch' backend was chosen"):
        use_cuda_graphs(True, "cuda", "torch")


def test_the_cuda_graphs_argument(tiny_model):
    assert EngineConfig().cuda_graphs is None and EngineConfig(cuda_graphs=False).cuda_graphs is False
    with pytest.raises(ValueError, match=r"EngineConfig.cuda_graphs='on' is invalid: must be None \(auto\), "
                                         r"True or False"):
        EngineConfig(cuda_graphs="on")
    assert LLM(tiny_model("llama"), kv_cache_memory="1MiB").engine.runner.decode_graphs is None  # auto on a CPU
    with pytest.raises(ValueError, match="cuda_graphs=True needs the model on a CUDA device"):
        LLM(tiny_model("llama"), kv_cache_memory="1MiB", cuda_graphs=True)


def test_capture_sizes_and_padding():
    assert capture_sizes(256) == [1, 2, 4, 8] + list(range(16, 257, 16))
    assert capture_sizes(100) == [1, 2, 4, 8, 16, 32, 48, 64, 80, 96, 100]
    assert capture_sizes(3) == [1, 2, 3] and capture_sizes(1) == [1] and capture_sizes(16) == [1, 2, 4, 8, 16]
    assert capture_sizes(5000)[-1] == 512
    sizes = capture_sizes(100)
    assert [padded_size(n, sizes) for n in (1, 3, 8, 9, 17, 96, 97, 100)] == [1, 4, 8, 16, 32, 96, 100, 100]
    assert padded_size(101, sizes) is None


def test_in_place_updates_keep_the_graphs_and_swaps_file_new_ones(tiny_model):
    params = list(tiny_model("llama").parameters())
    cache = GraphCache()
    first = data_addresses(params)
    cache.put(first, 8, "graph A8")
    with torch.no_grad():
        for p in params:
            p.copy_(p * 0.5)  # an in-place update: the same storage, seen by a replay
    assert data_addresses(params) == first and cache.get(first, 8) == "graph A8"
    buffers = WeightBuffers()  # the double-buffered update's own swap
    for p in params:
        buffers.swap_in(p, buffers.spare(p).copy_(p))
    second = data_addresses(params)
    assert all(a != b for a, b in zip(first, second)) and cache.get(second, 8) is None
    cache.put(second, 8, "graph B8")
    for p in params:  # the next double-buffered update swaps the first storage back
        buffers.swap_in(p, buffers.spare(p).copy_(p))
    assert data_addresses(params) == first and cache.get(first, 8) == "graph A8"
    assert cache.get(first, 16) is None  # another batch size: captured on first use
    cache.put(("a third set",), 8, "graph C8")  # evicts the set used least recently (second)
    assert cache.num_address_sets == 2 and len(cache) == 2
    assert cache.get(second, 8) is None and cache.get(first, 8) == "graph A8"


def _decode_step(llm):
    """A decode-only step of three running sequences, scheduled but not run: the runner's prepared inputs."""
    params = SamplingParams(temperature=0, max_tokens=8)
    for i, prompt in enumerate([[5, 9, 2], list(range(40, 60)), list(range(100, 137))]):
        llm.add_request(prompt, params, request_id=str(i))
    llm.step()  # the prefills
    llm.step()
    batch = llm.engine.scheduler.schedule()
    assert batch.num_new_tokens == [1, 1, 1]
    return llm.engine.runner.prepare(batch)


def test_padding_rows_reproduce_the_eager_step_and_write_only_the_scratch_block(tiny_model):
    llm = LLM(tiny_model("llama"), kv_cache_memory="1MiB", block_size=16, attention_backend="torch")
    runner = llm.engine.runner
    input_ids, positions, meta, rows, _, _ = _decode_step(llm)
    layers, num_blocks = runner.kv_cache.data.shape[0], runner.kv_cache.data.shape[2]
    padded_cache = PagedKVCache(layers, num_blocks + 1, *runner.kv_cache.data.shape[3:], torch.float32, "cpu")
    padded_cache.data[:, :, :num_blocks] = runner.kv_cache.data
    eager = runner.forward(input_ids, positions, meta, rows)

    static = StaticDecodeInputs(8, max_blocks=4, scratch_block=num_blocks, block_size=16, device="cpu")
    for buffer in (static.input_ids, static.positions, static.slot_mapping, static.context_lens):
        buffer.fill_(3)  # as a larger batch would leave them: padding must not write K/V at slot 3
    static.block_tables.fill_(0)
    assert static.holds(meta, len(input_ids))
    static.fill(input_ids, positions, meta, 8)
    assert static.slot_mapping[3:].eq(num_blocks * 16).all() and static.context_lens[3:].eq(1).all()
    assert static.block_tables[3:].eq(num_blocks).all() and static.input_ids[3:].eq(0).all()
    logits = runner.call_model(static.input_ids[:8], static.positions[:8],
                               static.metadata(8, padded_cache, runner.attention_ops), 0)
    torch.testing.assert_close(logits[:3], eager, atol=1e-4, rtol=0)  # batch 8 vs 3: fp32 GEMM rounding
    written = torch.zeros(num_blocks * 16, dtype=torch.bool)
    written[meta.slot_mapping] = True
    new = padded_cache.data[:, :, :num_blocks].flatten(2, 3)  # [layers, k/v, slots, heads, dim]
    old = runner.kv_cache.data.flatten(2, 3)
    assert torch.equal(new[:, :, ~written], old[:, :, ~written])  # no other sequence's slot was touched
    torch.testing.assert_close(new[:, :, written], old[:, :, written], atol=1e-4, rtol=0)
    assert padded_cache.data[:, :, num_blocks].abs().sum() > 0  # the padding rows' K/V went here


def test_a_step_with_a_prefill_or_too_many_blocks_is_not_for_a_graph(tiny_model):
    llm = LLM(tiny_model("llama"), kv_cache_memory="1MiB", block_size=16, attention_backend="torch")
    input_ids, _, meta, _, _, _ = _decode_step(llm)
    assert not StaticDecodeInputs(2, 4, 0, 16, "cpu").holds(meta, len(input_ids))  # 3 sequences
    assert not StaticDecodeInputs(8, 2, 0, 16, "cpu").holds(meta, len(input_ids))  # one has 3 blocks
    assert not StaticDecodeInputs(8, 4, 0, 16, "cpu").holds(meta, len(input_ids) + 1)  # a prefill token too
    graphs = DecodeGraphs(llm.engine.runner, capture_sizes(8), max_blocks=4, scratch_block=0)  # no CUDA until run
    assert graphs.fits(meta, len(input_ids), []) and not graphs.fits(meta, len(input_ids), [("a prompt row",)])


# -- on a GPU ------------------------------------------------------------------------------------------

PROMPTS = [[5, 9, 2], list(range(40, 60)), list(range(100, 137)), [7] * 50, [1, 2, 3, 4, 5]]


def _gpu_llm(model, graphs: bool, **kwargs) -> LLM:
    return LLM(model.cuda(), kv_cache_memory="16MiB", block_size=16, attention_backend="triton",
               cuda_graphs=graphs, **kwargs)


def _greedy(llm, max_tokens: int = 12):
    out = llm.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=max_tokens, logprobs=0), use_tqdm=False)
    return [o.outputs[0].token_ids for o in out], [torch.tensor(o.outputs[0].logprobs) for o in out]


def _assert_same(got, want):
    assert got[0] == want[0]
    for g, w in zip(got[1], want[1]):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=0)


@cuda
@pytest.mark.cuda
def test_greedy_with_graphs_equals_eager(tiny_model):
    eager = _greedy(_gpu_llm(tiny_model("llama"), False))
    llm = _gpu_llm(tiny_model("llama"), True)
    _assert_same(_greedy(llm), eager)
    graphs = llm.engine.runner.decode_graphs
    assert graphs.num_captures >= 1 and len(graphs.graphs) == graphs.num_captures  # decodes ran as graphs
    captures = graphs.num_captures
    _assert_same(_greedy(llm), eager)
    assert graphs.num_captures == captures  # the same weights: replayed, not captured again
    llm.sleep()  # frees the KV cache and the graphs with it; waking up makes a new KV cache
    assert len(graphs.graphs) == 0
    llm.wake_up()
    _assert_same(_greedy(llm), eager)
    assert graphs.num_captures == 2 * captures


def _perturbed(model) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [(n, p.detach().cpu() + 0.3 * torch.randn(p.shape, generator=g)) for n, p in model.named_parameters()]


def _steps_with_an_update(llm, update, steps_before: int = 3) -> list:
    """Greedy tokens of every prompt when `update` (None: none) is applied after `steps_before` steps."""
    params = SamplingParams(temperature=0, max_tokens=10)
    for i, prompt in enumerate(PROMPTS):
        llm.add_request(prompt, params, request_id=str(i))
    done, steps = {}, 0
    while llm.has_unfinished():
        if steps == steps_before and update is not None:
            llm.update_weights(update)
        for out in llm.step():
            if out.finished:
                done[out.request_id] = out.output.outputs[0].token_ids
        steps += 1
    return [done[str(i)] for i in range(len(PROMPTS))]


@cuda
@pytest.mark.cuda
@pytest.mark.parametrize("double_buffer", [False, True])
def test_a_weight_update_between_steps_reaches_the_next_replay(tiny_model, double_buffer):
    update = _perturbed(tiny_model("llama"))
    want = _steps_with_an_update(_gpu_llm(tiny_model("llama"), False), update)
    llm = _gpu_llm(tiny_model("llama"), True, double_buffer_weights=double_buffer)
    got = _steps_with_an_update(llm, update)
    assert got == want
    stale = _steps_with_an_update(_gpu_llm(tiny_model("llama"), False), None)
    assert stale != want  # the update changes the tokens, so replaying the old weights would have shown
    graphs = llm.engine.runner.decode_graphs
    # in place: the graphs captured before the update replay the new weights; swapped: captured again
    assert graphs.graphs.num_address_sets == (2 if double_buffer else 1)
