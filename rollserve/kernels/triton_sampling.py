"""The fused sampling step in Triton: `sampling.sample` on the GPU, one program per row, no host sync.

A row's vocabulary is streamed in BLOCK_V tiles: max and argmax, then the log-sum-exp, then the filter
thresholds, then the draw. Thresholds are found without sorting, by bisection over the bit patterns of
non-negative fp32 numbers (ordered like the numbers): the top_k threshold is the largest t with
count(p >= t) >= k, the top_p one the smallest t >= it with mass(p > t) < top_p * (mass of the top_k
set). Both are then exactly one of the row's probabilities, as with a sort. Each bisection is 31
passes over the row, paid only by rows that ask for top_k or top_p.
"""

import torch
import triton
import triton.language as tl

BLOCK_V = 128
BISECTION_STEPS = 31  # bit patterns of fp32 in [0, 1] span [0, 0x3F800000] < 2**30


@triton.jit
def _probs(logits_row, offs, vocab, temp, m, log_sum):
    """p = exp(logits / T - logsumexp) of one tile (0 past the vocabulary); the same ops in every pass."""
    x = tl.load(logits_row + offs, mask=offs < vocab, other=float("-inf"))
    return tl.exp((x / temp - m) - log_sum)


@triton.jit
def _count_and_mass_above(logits_row, vocab, temp, m, log_sum, t, STRICT: tl.constexpr, BLOCK_V: tl.constexpr):
    count = 0
    mass = 0.0
    for start in range(0, vocab, BLOCK_V):
        p = _probs(logits_row, start + tl.arange(0, BLOCK_V), vocab, temp, m, log_sum)
        above = (p > t) if STRICT else (p >= t)
        count += tl.sum(above.to(tl.int32), axis=0)
        mass += tl.sum(tl.where(above, p, 0.0), axis=0)
    return count, mass


@triton.jit
def _sample_kernel(logits, temperature, greedy, top_k, top_p, min_p, uniforms, tokens, logprobs, vocab,
                   BLOCK_V: tl.constexpr, STEPS: tl.constexpr):
    row = tl.program_id(0)
    logits_row = logits + row.to(tl.int64) * vocab
    temp = tl.load(temperature + row)
    # Pass 1: max of logits / T, and the argmax of the logits (first index on ties, like torch.argmax).
    m = float("-inf")
    best = float("-inf")
    best_idx = 0
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + offs, mask=offs < vocab, other=float("-inf"))
        m = tl.maximum(m, tl.max(x / temp, axis=0))
        tile_best = tl.max(x, axis=0)
        tile_idx = tl.min(tl.where(x == tile_best, offs, vocab), axis=0)
        best_idx = tl.where(tile_best > best, tile_idx, best_idx)
        best = tl.maximum(best, tile_best)
    # Pass 2: log-sum-exp, as log_softmax computes it: (z - max) - log(sum(exp(z - max))).
    s = 0.0
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        x = tl.load(logits_row + offs, mask=offs < vocab, other=float("-inf"))
        s += tl.sum(tl.exp(x / temp - m), axis=0)
    log_sum = tl.log(s)
    p_max = tl.exp((m - m) - log_sum)
    k = tl.minimum(tl.load(top_k + row), vocab)
    tp = tl.load(top_p + row)
    thr = tl.load(min_p + row) * p_max
    thr_k = 0.0
    mass_k = 1.0
    if k > 0:
        lo = 0  # count(p >= 0) = vocab >= k
        hi = p_max.to(tl.int32, bitcast=True) + 1  # count(p >= next float above max) = 0 < k
        for _ in range(STEPS):
            mid = lo + (hi - lo) // 2
            count, _mass = _count_and_mass_above(logits_row, vocab, temp, m, log_sum,
                                                 mid.to(tl.float32, bitcast=True), False, BLOCK_V)
            enough = count >= k
            lo = tl.where(enough & (hi - lo > 1), mid, lo)
            hi = tl.where(~enough & (hi - lo > 1), mid, hi)
        thr_k = lo.to(tl.float32, bitcast=True)
        count, mass = _count_and_mass_above(logits_row, vocab, temp, m, log_sum, thr_k, True, BLOCK_V)
        mass_k = mass + (k - count).to(tl.float32) * thr_k  # exactly k tokens: the ties at thr_k fill it up
    thr_p = 0.0
    if tp < 1:
        target = tp * mass_k
        _count, above = _count_and_mass_above(logits_row, vocab, temp, m, log_sum, thr_k, True, BLOCK_V)
        thr_p = thr_k
        if above >= target:
            lo = thr_k.to(tl.int32, bitcast=True)  # mass(p > lo) >= target
            hi = p_max.to(tl.int32, bitcast=True)  # mass(p > max) = 0 < target
            for _ in range(STEPS):
                mid = lo + (hi - lo) // 2
                _count, mass = _count_and_mass_above(logits_row, vocab, temp, m, log_sum,
                                                     mid.to(tl.float32, bitcast=True), True, BLOCK_V)
                small = mass < target
                hi = tl.where(small & (hi - lo > 1), mid, hi)
                lo = tl.where(~small & (hi - lo > 1), mid, lo)
            thr_p = hi.to(tl.float32, bitcast=True)
    thr = tl.maximum(thr, tl.maximum(thr_k, thr_p))
    # The draw: the first token whose running sum of kept p exceeds u * (their total).
    _count, total = _count_and_mass_above(logits_row, vocab, temp, m, log_sum, thr, False, BLOCK_V)
    target = tl.load(uniforms + row) * total
    running = 0.0
    first = vocab
    last = 0
    for start in range(0, vocab, BLOCK_V):
        offs = start + tl.arange(0, BLOCK_V)
        p = _probs(logits_row, offs, vocab, temp, m, log_sum)
        kept = tl.where(p >= thr, p, 0.0)
        cs = running + tl.cumsum(kept, axis=0)
        first = tl.minimum(first, tl.min(tl.where(cs > target, offs, vocab), axis=0))
        last = tl.maximum(last, tl.max(tl.where(kept > 0, offs, 0), axis=0))
        running += tl.sum(kept, axis=0)
    token = tl.where(tl.load(greedy + row) != 0, best_idx, tl.minimum(first, last))
    x_tok = tl.load(logits_row + token)
    tl.store(tokens + row, token.to(tl.int64))
    tl.store(logprobs + row, (x_tok / temp - m) - log_sum)


def sample(logits: torch.Tensor, temperature: torch.Tensor, greedy: torch.Tensor, top_k: torch.Tensor,
           top_p: torch.Tensor, min_p: torch.Tensor, uniforms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as `sampling.sample`."""
    rows, vocab = logits.shape
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    if rows:
        _sample_kernel[(rows,)](logits.contiguous(), temperature.float(), greedy.to(torch.int32),
                                top_k.to(torch.int32), top_p.float(), min_p.float(), uniforms.float(), tokens,
                                logprobs, vocab, BLOCK_V=BLOCK_V, STEPS=BISECTION_STEPS)
    return tokens, logprobs
