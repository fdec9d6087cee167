"""The extension's packed fp32 GEMM (`csrc/gemm.cpp`) on its own: every tile and panel shape against a float64
linear, half-precision outputs rounded as torch rounds, a row's result independent of its batch, concatenated
weights equal to separate ones bit for bit, and bad inputs refused by name."""

import pytest
import torch

from rollserve.kernels import cpu_gemm

ext = cpu_gemm._extension_gemm()
pytestmark = pytest.mark.skipif(ext is None, reason="the extension's packed GEMM is not built here "
                                                    "(it needs AVX2/FMA without AVX-512)")


def _data(m, n, k, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(m, k, generator=gen), torch.randn(n, k, generator=gen), torch.randn(n, generator=gen))


@pytest.mark.parametrize("m", [1, 2, 5, 6, 7, 13, 32])
@pytest.mark.parametrize("n", [1, 15, 16, 17, 40])
@pytest.mark.parametrize("k", [1, 7, 64, 200])
def test_matches_float64(m, n, k):
    x, w, b = _data(m, n, k)
    wp = ext.pack_gemm_weight(w)
    assert wp.shape == ((n + 15) // 16, k, 16)
    exact = x.double() @ w.double().T
    for bias in (None, b):
        out = ext.packed_linear(x, wp, n, bias)
        assert out.shape == (m, n) and out.dtype == torch.float32
        expected = exact if bias is None else exact + b.double()
        torch.testing.assert_close(out.double(), expected, atol=1e-5 * k ** 0.5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("n", [16, 21])
def test_half_outputs_are_the_fp32_result_rounded_as_torch_rounds(dtype, n):
    """The store rounds once, to nearest even, as `.to(dtype)` of the fp32 result: ties, overflow, NaN, inf."""
    x, w, b = _data(13, n, 40, seed=6)
    x[0, 0], x[1, 0], x[2, 0] = float("nan"), float("inf"), 1e30  # rows of NaN, inf, overflow
    wp = ext.pack_gemm_weight(w)
    out = ext.packed_linear(x, wp, n, b, dtype)
    assert out.dtype == dtype and out.shape == (13, n)
    expected = ext.packed_linear(x, wp, n, b).to(dtype)
    assert torch.equal(out[~expected.isnan()], expected[~expected.isnan()])
    assert torch.equal(out.isnan(), expected.isnan())
    # exact values as outputs (x = 1, K = 1): bf16 ties of both parities, and fp16's largest finite rounding
    ties = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 65519.0])
    w1 = torch.zeros(16, 1)
    w1[:4, 0] = ties
    got = ext.packed_linear(torch.ones(1, 1), ext.pack_gemm_weight(w1), 16, None, dtype)[0, :4]
    assert torch.equal(got, ties.to(dtype))


def test_empty_batch():
    x, w, _ = _data(0, 20, 8)
    assert ext.packed_linear(x, ext.pack_gemm_weight(w), 20).shape == (0, 20)


def test_rows_do_not_depend_on_their_batch():
    """Each output is one FMA chain over k in order: a row computed alone, in any batch or position, is bit-equal."""
    x, w, b = _data(37, 50, 96, seed=1)
    wp = ext.pack_gemm_weight(w)
    full = ext.packed_linear(x, wp, 50, b)
    for i in (0, 5, 36):
        assert torch.equal(ext.packed_linear(x[i:i + 1], wp, 50, b), full[i:i + 1])
    perm = torch.randperm(37, generator=torch.Generator().manual_seed(2))
    assert torch.equal(ext.packed_linear(x[perm], wp, 50, b), full[perm])
    assert torch.equal(ext.packed_linear(x[:9], wp, 50, b), full[:9])


def test_concatenated_weights_equal_the_separate_ones():
    """What the fused q/k/v and gate/up projections rely on, whatever panel a projection starts in."""
    x, _, _ = _data(11, 1, 64, seed=3)
    ws = [torch.randn(n, 64, generator=torch.Generator().manual_seed(n)) for n in (21, 9, 16)]
    fused = ext.packed_linear(x, ext.pack_gemm_weight(torch.cat(ws)), 46)
    separate = torch.cat([ext.packed_linear(x, ext.pack_gemm_weight(w), w.shape[0]) for w in ws], dim=1)
    assert torch.equal(fused, separate)


def test_non_contiguous_input():
    x, w, _ = _data(8, 24, 32, seed=4)
    wp = ext.pack_gemm_weight(w)
    xt = x.T.contiguous().T  # same values, column-major
    assert not xt.is_contiguous()
    assert torch.equal(ext.packed_linear(xt, wp, 24), ext.packed_linear(x, wp, 24))


@pytest.mark.parametrize("call, message", [
    (lambda x, wp, b: ext.packed_linear(x[:, :31], wp, 24), "x has 31 features, the packed weight 32"),
    (lambda x, wp, b: ext.packed_linear(x.double(), wp, 24), "x must be a 2-D float32"),
    (lambda x, wp, b: ext.packed_linear(x[0], wp, 24), "x must be a 2-D float32"),
    (lambda x, wp, b: ext.packed_linear(x, wp, 33), "n=33 does not fit 2 panels"),
    (lambda x, wp, b: ext.packed_linear(x, wp, 16), "n=16 does not fit 2 panels"),
    (lambda x, wp, b: ext.packed_linear(x, wp[0], 24), "wp must come from pack_gemm_weight"),
    (lambda x, wp, b: ext.packed_linear(x, wp, 24, b[:20]), "bias must be a contiguous float32 [24]"),
    (lambda x, wp, b: ext.pack_gemm_weight(wp), "weight must be a 2-D float32"),
    (lambda x, wp, b: ext.packed_linear(x, wp, 24, None, torch.float64), "out_dtype must be float32, bfloat16 or"),
])
def test_bad_inputs_are_refused(call, message):
    x, w, b = _data(8, 24, 32, seed=5)
    with pytest.raises(RuntimeError, match=message.replace("[", r"\[")):
        call(x, ext.pack_gemm_weight(w), b)
