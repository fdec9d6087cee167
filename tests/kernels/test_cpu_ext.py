"""The C++ CPU kernels (when built: `make install`) against the torch references they replace."""

import pytest
import torch

from rollserve.kernels import cpu_ext
from rollserve.kernels.decode_attention import paged_decode_attention

pytestmark = pytest.mark.skipif(cpu_ext.extension() is None, reason="the CPU extension is not built")


def _case(num_seqs, num_heads, num_kv_heads, head_dim, block, lengths, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    width = max(-(-n // block) for n in lengths)
    num_blocks = num_seqs * width + 3
    k_cache = torch.randn(num_blocks, block, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(num_blocks, block, num_kv_heads, head_dim, generator=gen).to(dtype)
    free = torch.randperm(num_blocks, generator=gen).tolist()
    tables = torch.tensor([[free.pop() for _ in range(width)] for _ in range(num_seqs)])  # padding blocks too
    query = torch.randn(num_seqs, num_heads, head_dim, generator=gen).to(dtype)
    return query, k_cache, v_cache, tables, torch.tensor(lengths)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window, softcap", [(None, None), (5, None), (None, 3.0), (6, 2.0)])
@pytest.mark.parametrize("heads", [(4, 2, 8), (9, 3, 64), (4, 4, 16)])
def test_decode_attention_matches_the_reference(heads, sliding_window, softcap, dtype):
    num_heads, num_kv_heads, head_dim = heads
    lengths = [1, 4, 7, 13, 20, 16, 33]  # one token, a full block, partial blocks, beyond the window
    args = _case(len(lengths), num_heads, num_kv_heads, head_dim, 4, lengths, dtype, seed=head_dim)
    scale = head_dim ** -0.5
    out = cpu_ext.paged_decode_attention_ext(*args, scale, sliding_window, softcap)
    ref = paged_decode_attention(*args, scale, sliding_window, softcap)
    assert out.shape == ref.shape and out.dtype == dtype
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("sliding_window, softcap", [(None, None), (21, None), (None, 3.0)])
@pytest.mark.parametrize("heads", [(9, 3, 64), (8, 8, 32), (14, 2, 64), (8, 2, 128), (6, 3, 40)])
def test_vectorised_decode_attention_matches_the_reference(heads, sliding_window, softcap, dtype):
    """Engine-sized blocks: the vector path's eight-token score groups, their tails and partial blocks, query
    groups of one to seven heads (values three heads at a time), and a head_dim that is not a multiple of 32
    (the scalar path)."""
    _check_against_float64(heads, [1, 8, 9, 16, 23, 40, 100, 129], sliding_window, softcap, dtype,
                           seed=heads[0] + heads[2])


def _check_against_float64(heads, lengths, sliding_window, softcap, dtype, seed):
    """The kernel on blocks of 16 against the torch reference in float64."""
    num_heads, num_kv_heads, head_dim = heads
    args = _case(len(lengths), num_heads, num_kv_heads, head_dim, 16, lengths, dtype, seed=seed)
    scale = head_dim ** -0.5
    out = cpu_ext.paged_decode_attention_ext(*args, scale, sliding_window, softcap)
    ref = paged_decode_attention(*[a.double() if a.is_floating_point() else a for a in args], scale,
                                 sliding_window, softcap)
    tol = dict(atol=2e-6, rtol=2e-6) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(out, ref.to(dtype), **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("sliding_window", [None, 300])
@pytest.mark.parametrize("heads", [(9, 3, 64), (14, 2, 64)])
def test_vectorised_decode_attention_over_long_contexts(heads, sliding_window, dtype):
    """Contexts of hundreds of tokens (a rollout's, where the online softmax rescales many times and every
    block prefetches the next), and a window that starts inside the sequence."""
    _check_against_float64(heads, [255, 256, 257, 600, 1000], sliding_window, None, dtype, seed=7 + heads[0])


@pytest.mark.parametrize("cache_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("heads", [(9, 3, 64), (6, 3, 40)])
def test_decode_attention_over_a_16_bit_cache_with_float32_queries(heads, cache_dtype):
    """`EngineConfig.kv_cache_dtype`: fp32 queries over a bf16/fp16 cache (vector and scalar paths), against the
    float64 reference over the same 16-bit K/V, to fp32 accuracy: the only rounding is the cache's own."""
    num_heads, num_kv_heads, head_dim = heads
    lengths = [1, 9, 16, 40, 129, 600]
    query, k_cache, v_cache, tables, lens = _case(len(lengths), num_heads, num_kv_heads, head_dim, 16, lengths,
                                                  torch.float32, seed=head_dim)
    k16, v16 = k_cache.to(cache_dtype), v_cache.to(cache_dtype)
    for window in (None, 21):
        out = cpu_ext.paged_decode_attention_ext(query, k16, v16, tables, lens, head_dim ** -0.5, window)
        assert out.dtype == torch.float32
        ref = paged_decode_attention(query.double(), k16.double(), v16.double(), tables, lens, head_dim ** -0.5,
                                     window)
        torch.testing.assert_close(out, ref.float(), atol=2e-6, rtol=2e-6)
        # and the torch reference reads the same 16-bit cache under fp32 queries
        torch.testing.assert_close(paged_decode_attention(query, k16, v16, tables, lens, head_dim ** -0.5, window),
                                   ref.float(), atol=2e-6, rtol=2e-6)
    with pytest.raises(RuntimeError, match="bfloat16/float16 under float32"):
        cpu_ext.paged_decode_attention_ext(query.to(cache_dtype), k_cache, v_cache, tables, lens, 0.125)


def test_decode_attention_reads_a_strided_query_and_the_engine_cache_layout():
    """The engine passes q as a transposed view and one layer's K (or V) of the [layers, 2, ...] cache."""
    query, k_cache, v_cache, tables, lens = _case(6, 9, 3, 64, 16, [17, 40, 3, 64, 65, 1], torch.float32, seed=7)
    data = torch.stack([torch.stack([k_cache, v_cache])] * 2)  # [layers, k/v, blocks, block, heads, dim]
    strided = query.transpose(0, 1).contiguous().transpose(0, 1)
    out = cpu_ext.paged_decode_attention_ext(strided, data[1, 0], data[1, 1], tables, lens, 0.125)
    torch.testing.assert_close(out, paged_decode_attention(query, k_cache, v_cache, tables, lens, 0.125),
                               atol=2e-6, rtol=2e-6)


def _kv_write_case(cache_dtype, key_dtype, num_tokens, seed):
    gen = torch.Generator().manual_seed(seed)
    k_cache = torch.randn(7, 16, 3, 64, generator=gen).to(cache_dtype)
    v_cache = torch.randn(7, 16, 3, 64, generator=gen).to(cache_dtype)
    slots = torch.randperm(7 * 16, generator=gen)[:num_tokens]
    # key and value as the engine has them: views into one fused projection's output
    qkv = (torch.randn(num_tokens, 9 * 64 + 2 * 3 * 64, generator=gen) * 300).to(key_dtype)
    key = qkv[:, 9 * 64:12 * 64].view(num_tokens, 3, 64)
    value = qkv[:, 12 * 64:].view(num_tokens, 3, 64)
    return k_cache, v_cache, key, value, slots


@pytest.mark.parametrize("cache_dtype, key_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                                    (torch.float16, torch.float16), (torch.bfloat16, torch.float32),
                                                    (torch.float16, torch.float32)])
@pytest.mark.parametrize("num_tokens", [0, 1, 64, 112])
def test_write_kv_is_bit_equal_to_the_reference(cache_dtype, key_dtype, num_tokens):
    """Every slot's K/V as the reference's index_copy_ leaves it (rounded to a 16-bit cache as `.to` rounds,
    x300 so float16 overflows to inf), every other slot untouched; strided key/value views."""
    from rollserve.kernels.kv_write import write_kv

    k_cache, v_cache, key, value, slots = _kv_write_case(cache_dtype, key_dtype, num_tokens, seed=num_tokens)
    want_k, want_v = k_cache.clone(), v_cache.clone()
    write_kv(want_k, want_v, key, value, slots)
    cpu_ext.write_kv_or_reference(k_cache, v_cache, key, value, slots)
    assert torch.equal(k_cache, want_k) and torch.equal(v_cache, want_v)


def test_write_kv_refuses_bad_input_and_writes_nothing():
    ext = cpu_ext.extension()
    k_cache, v_cache, key, value, slots = _kv_write_case(torch.float32, torch.float32, 5, seed=3)
    before_k, before_v = k_cache.clone(), v_cache.clone()
    bad = slots.clone()
    bad[3] = 7 * 16  # one past the last slot: the slots before it must not have been written either
    with pytest.raises(RuntimeError, match=r"slot_mapping\[3\] = 112 is outside the cache's 112 slots"):
        ext.write_kv(k_cache, v_cache, key, value, bad)
    bad[3] = -1
    with pytest.raises(RuntimeError, match=r"slot_mapping\[3\] = -1"):
        ext.write_kv(k_cache, v_cache, key, value, bad)
    with pytest.raises(RuntimeError, match="slot_mapping must be int64"):
        ext.write_kv(k_cache, v_cache, key, value, slots.int())
    with pytest.raises(RuntimeError, match="key and value must be"):
        ext.write_kv(k_cache, v_cache, key[:, :2], value[:, :2], slots)
    with pytest.raises(RuntimeError, match="one dtype"):
        ext.write_kv(k_cache, v_cache, key.double(), value.double(), slots)
    with pytest.raises(RuntimeError, match="must be contiguous"):
        ext.write_kv(k_cache.transpose(1, 2), v_cache.transpose(1, 2), key, value, slots)
    assert torch.equal(k_cache, before_k) and torch.equal(v_cache, before_v)


def _torch_plain(logits, temperature, greedy, uniforms):
    """The engine's torch plain path (`Sampler._plain`) on these rows."""
    from types import SimpleNamespace

    from rollserve.engine.sampler import Sampler

    t1 = bool((temperature == 1).all())
    batch = SimpleNamespace(temperature=temperature, greedy=greedy, chunk_all_t1=lambda e: t1,
                            chunk_greedy=lambda e: (bool(greedy[e].any()), bool(greedy[e].all())))
    out = Sampler._plain(logits, batch, uniforms)
    return out.token_ids, out.logprobs


@pytest.mark.parametrize("vocab", [5, 128, 300, 49152])
@pytest.mark.parametrize("temperature", [1.0, 0.7, 1.6])
def test_sample_draws_the_torch_paths_tokens(vocab, temperature):
    """Same uniforms, same tokens as the engine's torch plain path; the logprob within 2e-5 of the trainer's
    log_softmax(logits / T); greedy rows the first maximal logit (a tie planted in row 1)."""
    gen = torch.Generator().manual_seed(vocab)
    rows = 40
    logits = torch.randn(rows, vocab, generator=gen) * 4
    logits[1, vocab // 2] = logits[1, vocab - 1] = logits[1].max() + 1
    temps = torch.full((rows,), temperature)
    greedy = torch.zeros(rows, dtype=torch.bool)
    greedy[:3] = True
    temps[greedy] = 1.0
    u = torch.rand(rows, generator=gen)
    u[3], u[4] = 0.0, 1.0 - 2 ** -24
    off = torch.zeros(rows, dtype=torch.int32)
    tokens, logprobs = cpu_ext.sample(logits, temps, greedy, off, torch.ones(rows), torch.zeros(rows), u)
    want_tokens, want_logprobs = _torch_plain(logits, temps, greedy, u)
    assert torch.equal(tokens, want_tokens)
    assert int(tokens[1]) == vocab // 2
    policy = torch.log_softmax(logits / temps[:, None], dim=-1).gather(1, tokens[:, None]).squeeze(1)
    torch.testing.assert_close(logprobs, policy, atol=2e-5, rtol=0)
    torch.testing.assert_close(logprobs, want_logprobs, atol=2e-5, rtol=0)


def test_sample_never_draws_a_token_of_zero_weight():
    """Tokens whose weight is 0 (masked to -inf, or underflowing) are never drawn: u = 0 gives the first token
    with weight, u just below 1 the last, whatever blocks lie around them."""
    vocab = 1000
    logits = torch.full((3, vocab), float("-inf"))
    logits[:, 130] = 0.0
    logits[:, 131] = -200.0  # exp underflows to 0
    logits[:, 700] = 1.0
    u = torch.tensor([0.0, 1.0 - 2 ** -24, 0.5])
    ones, off = torch.ones(3), torch.zeros(3, dtype=torch.int32)
    tokens, logprobs = cpu_ext.sample(logits, ones, torch.zeros(3, dtype=torch.bool), off, ones, torch.zeros(3), u)
    assert tokens.tolist() == [130, 700, 700]
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, -1)[[0, 1, 2], tokens], atol=1e-6, rtol=0)


def test_sample_refuses_bad_input():
    ext = cpu_ext.extension()
    logits, t, g, u = torch.randn(2, 10), torch.ones(2), torch.zeros(2, dtype=torch.bool), torch.rand(2)
    with pytest.raises(RuntimeError, match=r"temperature\[1\] = 0 \(must be finite and > 0\)"):
        ext.sample_plain(logits, torch.tensor([1.0, 0.0]), g, u)
    with pytest.raises(RuntimeError, match="logits must be float32"):
        ext.sample_plain(logits.double(), t, g, u)
    with pytest.raises(RuntimeError, match="greedy must be bool"):
        ext.sample_plain(logits, t, g.int(), u)
    with pytest.raises(RuntimeError, match="uniforms must be float32"):
        ext.sample_plain(logits, t, g, u[:1])
    with pytest.raises(ValueError, match="without top_k/top_p/min_p"):
        cpu_ext.sample(logits, t, g, torch.tensor([0, 5]), torch.ones(2), torch.zeros(2), u)


def test_the_engine_samples_on_the_cpu_kernel_as_on_its_torch_path(tiny_model, monkeypatch):
    """sampling_backend="cpu" (auto's choice on the CPU): the same tokens as "torch" for seeded and unseeded,
    greedy and sampled rows of plain batches, logprobs within 2e-5; the kernel ran on every plain step."""
    from rollserve import LLM, SamplingParams

    prompts = [[5, 9, 2], list(range(40, 60)), [7, 7, 7, 7]]
    params = [SamplingParams(temperature=1.0, max_tokens=6, seed=3, n=2, logprobs=0),
              SamplingParams(temperature=0.7, max_tokens=6, logprobs=0),
              SamplingParams(temperature=0, max_tokens=6, logprobs=0)]

    def generate(backend):
        llm = LLM(tiny_model("llama"), kv_cache_memory="1MiB", block_size=16, seed=11, sampling_backend=backend)
        return [[(c.token_ids, c.logprobs) for c in o.outputs] for o in llm.generate(prompts, params, use_tqdm=False)]

    want = generate("torch")
    calls = []
    kernel = cpu_ext.sample
    monkeypatch.setattr(cpu_ext, "sample", lambda logits, *a: calls.append(len(logits)) or kernel(logits, *a))
    got = generate("auto")
    assert calls and sum(calls) == 4 * 6
    for w, g in zip(want, got):
        for (w_ids, w_lps), (g_ids, g_lps) in zip(w, g):
            assert g_ids == w_ids
            torch.testing.assert_close(torch.tensor(g_lps), torch.tensor(w_lps), atol=2e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("width", [7, 15, 64, 100, 576, 2048, 5120])
def test_add_rms_norm_is_bit_equal_to_the_hf_module(width, dtype):
    """Widths below, at and between torch's vector width and long enough for the sum's cascade levels."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from rollserve.engine.lean_forward import _SUM_LANES

    gen = torch.Generator().manual_seed(width)
    x = (torch.randn(33, width, generator=gen) * torch.rand(33, 1, generator=gen) * 8).to(dtype)
    residual = torch.randn(33, width, generator=gen).to(dtype)
    norm = LlamaRMSNorm(width, eps=1e-6).to(dtype)
    with torch.no_grad():
        norm.weight.copy_(torch.rand(width, generator=gen) + 0.5)
        total, out = cpu_ext.extension().add_rms_norm(x, residual, norm.weight, 1e-6, _SUM_LANES)
        alone, out_alone = cpu_ext.extension().add_rms_norm(x, None, norm.weight, 1e-6, _SUM_LANES)
        assert torch.equal(total, residual + x) and torch.equal(alone, x)
        assert torch.equal(out, norm(residual + x))
        assert torch.equal(out_alone, norm(x))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_rope_is_bit_equal_to_hf_apply_rotary_pos_emb(dtype):
    """On a strided [T, H, D] view (a slice of the fused q/k/v output), as the lean forward passes it."""
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(21, 9 + 3 + 3, 64, generator=gen).to(dtype)
    q = qkv[:, :9]
    rotary = LlamaRotaryEmbedding(LlamaConfig(hidden_size=576, num_attention_heads=9, head_dim=64))
    positions = torch.randint(0, 2000, (1, 21), generator=gen)
    cos, sin = rotary(qkv[None], positions)
    out = cpu_ext.extension().rope(q, cos[0], sin[0])
    ref, _ = apply_rotary_pos_emb(q.transpose(0, 1)[None], q.transpose(0, 1)[None], cos, sin)
    assert out.is_contiguous() and torch.equal(out, ref[0].transpose(0, 1))
