"""Turns logits into sampled tokens and their logprobs, with per-row parameters as batched tensor ops.

Per row: penalties (repetition / presence / frequency) and `min_tokens`
masking -> temperature -> top_k -> top_p -> min_p -> one draw. The filters are
all thresholds on the temperature-scaled probabilities: top_k keeps
p >= the k-th largest, top_p keeps the smallest most-likely set whose mass
within the top_k set reaches top_p, min_p keeps p >= min_p * max p. Only the
few largest values are needed to find those thresholds (`torch.topk`, widened
for the rare row whose top_p mass lies deeper), never a full sort.

Reported logprobs follow the row's `logprobs_mode`: "policy" is
`log_softmax(logits / T)` on the unmodified logits (T = 1 when greedy), on the
trainer's own division; "sampling" is the distribution actually drawn from;
"raw" is `log_softmax(logits)`. When a batch asks for no top logprobs and
nothing modifies or filters its logits (the RL rollout case), the sampled
token's logprob is `z[tok] - logsumexp(z)` from the same exp pass the draw
uses, within float rounding of the trainer's `log_softmax`; otherwise the
full [rows, vocab] `log_softmax` is the trainer's op, bit for bit.

Plain batches may instead take one fused kernel (chosen by `EngineConfig.sampling_backend`): Triton on a
GPU (`kernels/triton_sampling.py`), the C++ extension's on the CPU (`kernels/csrc/sampling.cpp`): the same
draw for the same uniforms except within float rounding of a CDF step, the logprob within ~1e-6.

Sampling inverts each row's CDF with one uniform number (drawn from the row's
own generator when the request is seeded), so a seeded row's draw does not
depend on the rest of the batch. Rows are processed a few at a time so the
[rows, vocab] temporaries stay in cache: on the CPU these passes are memory-bound.
"""

from dataclasses import dataclass

import torch

ROWS_PER_CHUNK = 16
CDF_BLOCK = 128  # the CDF is inverted in two levels: blocks of the vocabulary, then tokens within a block
TOPK_BLOCK = 32  # top-w values are looked for in the w blocks of 32 with the largest maxima
TOP_P_WIDTHS = (64, 1024)  # filter thresholds are looked for among the top 64 (or top_k), then 1024, then a full sort
_LOG2E = 1.4426950408889634
_MODES = {"policy": 0, "sampling": 1, "raw": 2}


@dataclass
class SamplerOutput:
    token_ids: torch.Tensor  # [rows] long
    logprobs: torch.Tensor  # [rows] float32, in each row's logprobs_mode
    top_ids: torch.Tensor | None = None  # [rows, k_max] long, when some row asked for logprobs > 0
    top_logprobs: torch.Tensor | None = None  # [rows, k_max] float32
    ranks: torch.Tensor | None = None  # [rows] long: 1 + number of tokens more likely than the sampled one


def _block_sums(e: torch.Tensor) -> torch.Tensor:
    # e: [rows, vocab] -> [rows, ceil(vocab / CDF_BLOCK)]
    rows, vocab = e.shape
    full = vocab // CDF_BLOCK * CDF_BLOCK
    sums = e[:, :full].view(rows, -1, CDF_BLOCK).sum(-1)
    if full < vocab:
        sums = torch.cat([sums, e[:, full:].sum(-1, keepdim=True)], dim=1)
    return sums


def _invert_cdf(e: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Draws by inverting each row's CDF of unnormalised weights `e` [rows, vocab] at fraction `u` [rows].

    Returns (token, total weight) per row: the first token whose running sum
    exceeds u * total (never a zero-weight token), and the row's sum of `e`.
    """
    vocab = e.shape[1]
    sums = _block_sums(e)  # [rows, blocks]
    total = sums.sum(-1)
    target = u * total
    csum = sums.cumsum(-1)
    block = torch.searchsorted(csum, target[:, None], right=True).clamp_max(csum.shape[1] - 1)
    before = torch.where(block > 0, csum.gather(1, (block - 1).clamp_min(0)), torch.zeros_like(target[:, None]))
    idx = block * CDF_BLOCK + torch.arange(CDF_BLOCK, device=e.device)  # [rows, CDF_BLOCK]
    valid = idx < vocab
    cs = torch.where(valid, e.gather(1, idx.clamp_max(vocab - 1)), 0.0).cumsum(-1)
    j = torch.searchsorted(cs, target[:, None] - before, right=True)
    last = (cs < cs[:, -1:]).sum(-1, keepdim=True)  # where the block's mass is reached: a non-zero token
    return (block * CDF_BLOCK + torch.minimum(j, last)).squeeze(1), total


def _topk(x: torch.Tensor, w: int) -> tuple[torch.Tensor, torch.Tensor]:
    """`torch.topk(x, w)` (sorted) of a contiguous [rows, vocab] tensor, looking only where it can be.

    The w largest values lie in the w blocks of TOPK_BLOCK with the largest
    maxima, so one max-reduction over the row picks the blocks and the exact
    top-w is taken among their w * TOPK_BLOCK values.
    """
    rows, vocab = x.shape
    b = TOPK_BLOCK
    if w * b * 4 > vocab or vocab % b or not x.is_contiguous():
        return torch.topk(x, w, dim=-1)
    xb = x.view(rows, vocab // b, b)
    blocks = torch.topk(xb.amax(-1), w, dim=-1).indices  # [rows, w]
    cand = xb.gather(1, blocks[:, :, None].expand(-1, -1, b)).reshape(rows, w * b)
    vals, idx = torch.topk(cand, w, dim=-1)
    return vals, blocks.gather(1, idx // b) * b + idx % b


def _filter_thresholds(vals: torch.Tensor, k: torch.Tensor, top_k_on: torch.Tensor, top_p: torch.Tensor,
                       min_p: torch.Tensor):
    """Thresholds from `vals` [rows, w], each row's w largest probabilities in descending order.

    k: [rows] top_k set size (vocab when off). Returns (threshold, resolved):
    the smallest probability kept by top_k, top_p (the smallest most-likely
    set whose mass within the top_k set reaches top_p) and min_p, and whether
    `w` values were enough to decide it.
    """
    w = vals.shape[1]
    fits = k <= w
    inside = torch.arange(w, device=vals.device)[None, :] < k[:, None]
    v = torch.where(inside, vals, 0.0)
    cs = v.cumsum(-1)
    # Mass of the top_k set: its sum when it fits in `vals`; the whole row (normalised) when top_k is off.
    mass = torch.where(fits, cs[:, -1], torch.ones_like(top_p))
    before = (cs - v) / mass[:, None]  # mass strictly before each token
    count = ((before < top_p[:, None]) & inside).sum(-1).clamp_min(1)  # tokens top_p keeps
    thr_p = torch.where(top_p < 1, vals.gather(1, (count - 1)[:, None]).squeeze(1), 0.0)
    thr_k = torch.where(top_k_on, vals.gather(1, (k.clamp_max(w) - 1)[:, None]).squeeze(1), 0.0)
    thr = torch.maximum(torch.maximum(thr_k, thr_p), min_p * vals[:, 0])
    resolved_k = ~top_k_on | fits
    resolved_p = (top_p >= 1) | fits | ((count < w) & ~top_k_on)
    return thr, resolved_k & resolved_p


def _thresholds(p: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Smallest probability each row keeps after top_k, top_p and min_p. p: [rows, vocab], rows sum to 1."""
    rows, vocab = p.shape
    top_k_on = top_k > 0
    k = torch.where(top_k_on, top_k.clamp_max(vocab), torch.full_like(top_k, vocab))
    thr = torch.zeros(rows, device=p.device)
    todo = torch.arange(rows, device=p.device)
    first = min(vocab, max(TOP_P_WIDTHS[0], int(k[top_k_on].max()) if bool(top_k_on.any()) else 0))
    widths = [first] + [w for w in TOP_P_WIDTHS[1:] if first < w < vocab] + ([vocab] if first < vocab else [])
    for w in widths:
        sub = p if len(todo) == rows else p[todo]
        vals = _topk(sub, w)[0] if w < vocab else torch.sort(sub, dim=-1, descending=True).values
        t, resolved = _filter_thresholds(vals, k[todo], top_k_on[todo], top_p[todo], min_p[todo])
        thr[todo] = t
        if w == vocab or bool(resolved.all()):
            break
        todo = todo[~resolved]  # only rows whose thresholds lie deeper go on to a wider search
    return thr


class SamplingBatch:
    """Per-row sampling parameters as tensors, built once per step from the rows' sequences."""

    def __init__(self, seqs: list, eos_token_ids, vocab: int, device):
        params = [s.params for s in seqs]
        rows = len(params)
        self.rows = rows
        self.params = params
        self.generators = [s.generator for s in seqs]
        self.temperature = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=device)
        self.greedy = torch.tensor([p.temperature == 0 for p in params], device=device)
        self._t1 = [p.temperature in (0, 1) for p in params]
        self._greedy = [p.temperature == 0 for p in params]
        self.mode = torch.tensor([_MODES[p.logprobs_mode] for p in params], device=device)
        self.modes = {p.logprobs_mode for p in params}
        self.k_max = max((p.logprobs or 0) for p in params)
        # Width of the top list kept for top logprobs: also wide enough to rank most sampled tokens.
        self.rank_width = min(256, max([16] + [p.top_k for p in params]))
        filt = [i for i, p in enumerate(params) if p.has_filters]
        self.any_filters = bool(filt)
        if filt:
            self.top_k = torch.tensor([p.top_k for p in params], device=device)
            self.top_p = torch.tensor([p.top_p for p in params], device=device)
            self.min_p = torch.tensor([p.min_p for p in params], device=device)
        # Penalties and min_tokens masks, applied to the logits the draw uses (never to "policy"/"raw" logprobs).
        self.penalty_rows = [i for i, p in enumerate(params) if p.has_penalties]
        if self.penalty_rows:
            self._build_penalties(seqs, vocab, device)
        self.mask_rows, self.mask_cols = [], []
        for i, (seq, p) in enumerate(zip(seqs, params)):
            if seq.num_completion_tokens < p.min_tokens:
                banned = set(p.stop_token_ids) | (set() if p.ignore_eos else set(eos_token_ids))
                self.mask_rows.extend([i] * len(banned))
                self.mask_cols.extend(sorted(banned))
        self.modifies_logits = bool(self.penalty_rows or self.mask_rows)
        # Every row draws from softmax(logits / T) unmodified and reports only the sampled token's logprob
        # in a mode that equals the policy's there ("raw" is the policy at T = 1).
        self.plain = not (self.k_max or self.any_filters or self.modifies_logits) and all(
            p.logprobs_mode != "raw" or p.temperature in (0, 1) for p in params)

    def chunk_all_t1(self, e: slice) -> bool:
        return all(self._t1[e])

    def chunk_greedy(self, e: slice) -> tuple[bool, bool]:
        """(any, all) rows of the chunk greedy."""
        g = self._greedy[e]
        return any(g), all(g)

    def chunk_filters(self, e: slice) -> bool:
        return self.any_filters and any(p.has_filters for p in self.params[e])

    def _build_penalties(self, seqs, vocab: int, device) -> None:
        rows = self.penalty_rows
        out_ids = [seqs[i].token_ids[seqs[i].num_prompt_tokens:] for i in rows]
        prompt_ids = [seqs[i].token_ids[:seqs[i].num_prompt_tokens] for i in rows]
        self.pen_index = torch.tensor(rows, dtype=torch.long, device=device)
        self.pen_out = _padded(out_ids, vocab, device)
        self.pen_prompt = _padded(prompt_ids, vocab, device)
        ps = [self.params[i] for i in rows]
        self.pen_rep = torch.tensor([p.repetition_penalty for p in ps], device=device)
        self.pen_pres = torch.tensor([p.presence_penalty for p in ps], device=device)
        self.pen_freq = torch.tensor([p.frequency_penalty for p in ps], device=device)

    def apply_penalties(self, logits: torch.Tensor) -> torch.Tensor:
        """Returns a modified copy of `logits` [rows, vocab] (the full batch)."""
        z = logits.clone()
        if self.penalty_rows:
            vocab = z.shape[1]
            sub = z[self.pen_index]
            counts = torch.zeros(len(self.penalty_rows), vocab + 1, device=z.device)  # column `vocab` eats padding
            counts.scatter_add_(1, self.pen_out, torch.ones_like(self.pen_out, dtype=counts.dtype))
            counts = counts[:, :vocab]
            seen = counts > 0
            prompt_seen = torch.zeros(len(self.penalty_rows), vocab + 1, dtype=torch.bool, device=z.device)
            prompt_seen.scatter_(1, self.pen_prompt, True)
            seen_any = seen | prompt_seen[:, :vocab]
            rep = self.pen_rep[:, None]
            sub = torch.where(seen_any, torch.where(sub > 0, sub / rep, sub * rep), sub)
            sub = sub - self.pen_freq[:, None] * counts - self.pen_pres[:, None] * seen.to(sub.dtype)
            z[self.pen_index] = sub
        if self.mask_rows:
            z[self.mask_rows, self.mask_cols] = float("-inf")
        return z


def _padded(lists: list[list[int]], pad: int, device) -> torch.Tensor:
    """[len(lists), longest] token ids padded with `pad` (an extra column of the count tensors)."""
    width = max(1, max(len(x) for x in lists))
    out = torch.full((len(lists), width), pad, dtype=torch.long)
    for i, x in enumerate(lists):
        if x:
            out[i, :len(x)] = torch.tensor(x, dtype=torch.long)
    return out.to(device)


class Sampler:
    """`fused`: a `kernels.sampling.sample`-like kernel for plain batches (`kernels.backend.sampling_kernel`), or
    None for the torch path everywhere."""

    def __init__(self, seed: int, fused=None):
        self.generator = torch.Generator().manual_seed(seed)
        self.fused = fused

    def _uniforms(self, generators: list) -> torch.Tensor:
        u = torch.rand(len(generators), generator=self.generator)
        for i, g in enumerate(generators):
            if g is not None:
                u[i] = torch.rand((), generator=g)
        return u

    def __call__(self, logits: torch.Tensor, batch: SamplingBatch) -> SamplerOutput:
        """logits: [rows, vocab] float32, row i belonging to `batch`'s row i."""
        rows, vocab = logits.shape
        dev = logits.device
        u = self._uniforms(batch.generators).to(dev)
        if batch.plain:
            if self.fused is not None:
                return self._fused_plain(logits, batch, u)
            return self._plain(logits, batch, u)
        z_all = batch.apply_penalties(logits) if batch.modifies_logits else logits
        tokens = torch.empty(rows, dtype=torch.long, device=dev)
        logprobs = torch.empty(rows, dtype=torch.float32, device=dev)
        k = batch.k_max
        top_ids = torch.empty(rows, k, dtype=torch.long, device=dev) if k else None
        top_lps = torch.empty(rows, k, dtype=torch.float32, device=dev) if k else None
        ranks = torch.empty(rows, dtype=torch.long, device=dev) if k else None
        for s in range(0, rows, ROWS_PER_CHUNK):
            e = slice(s, s + ROWS_PER_CHUNK)
            x, z, temps, greedy = logits[e], z_all[e], batch.temperature[e, None], batch.greedy[e]
            any_greedy, all_greedy = batch.chunk_greedy(e)
            # The trainer's own op on the trainer's own division, so the numbers match bit for bit.
            # (x / 1.0 is x exactly: skip the pass when the chunk's temperatures are all 1.)
            policy = torch.log_softmax(x if batch.chunk_all_t1(e) else x / temps, dim=-1)
            dist = torch.log_softmax(z / temps, dim=-1) if batch.modifies_logits else policy  # [chunk, vocab], T-scaled
            probs = dist.exp()
            filtered = False
            if batch.chunk_filters(e):
                thr = _thresholds(probs, batch.top_k[e], batch.top_p[e], batch.min_p[e])
                probs.masked_fill_(probs < thr[:, None], 0.0)
                filtered = True
            if all_greedy:
                tok = z.argmax(dim=-1)
            elif any_greedy:
                tok = torch.where(greedy, z.argmax(dim=-1), _invert_cdf(probs, u[e])[0])
            else:
                tok = _invert_cdf(probs, u[e])[0]
            tokens[e] = tok
            # Logprobs in each row's mode.
            report = self._report(batch, e, x, policy, dist, probs, filtered)
            sel = report.gather(1, tok[:, None]).squeeze(1)
            logprobs[e] = sel
            if k:
                vals, ids = _topk(report, min(vocab, max(k, batch.rank_width)))
                top_ids[e], top_lps[e] = ids[:, :k], vals[:, :k]
                # The rank from the top list when the sampled token is in it, else by counting its row.
                rank = (vals > sel[:, None]).sum(-1) + 1
                deeper = sel < vals[:, -1]
                if bool(deeper.any()):
                    d = deeper.nonzero().squeeze(1)
                    rank[d] = (report[d] > sel[d, None]).sum(-1) + 1
                ranks[e] = rank
        return SamplerOutput(tokens, logprobs, top_ids, top_lps, ranks)

    @staticmethod
    def _plain(logits: torch.Tensor, batch: SamplingBatch, u: torch.Tensor) -> SamplerOutput:
        """Draws from softmax(z), z = logits / T, with the sampled token's logprob as z[tok] - logsumexp(z).

        One exp pass over the vocabulary serves both the draw and the logsumexp;
        no [rows, vocab] log_softmax (nor z) is materialised. The weights are
        exp2((x - max x) * log2(e) / T) = exp(z - max z): exp2 is the cheaper
        kernel on the CPU, and subtracting the max first keeps the exponents of
        the tokens that carry the mass exact.
        """
        rows, vocab = logits.shape
        dev = logits.device
        tokens = torch.empty(rows, dtype=torch.long, device=dev)
        logprobs = torch.empty(rows, dtype=torch.float32, device=dev)
        buf = torch.empty(min(rows, ROWS_PER_CHUNK), vocab, dtype=logits.dtype, device=dev)
        for s in range(0, rows, ROWS_PER_CHUNK):
            e = slice(s, s + ROWS_PER_CHUNK)
            x = logits[e]
            t1 = batch.chunk_all_t1(e)
            temps = None if t1 else batch.temperature[e, None]
            mx = x.amax(dim=-1, keepdim=True)
            w = torch.sub(x, mx, out=buf[:len(x)])
            w = w.mul_(_LOG2E if t1 else _LOG2E / temps).exp2_()  # [chunk, vocab] unnormalised probabilities
            any_greedy, all_greedy = batch.chunk_greedy(e)
            if all_greedy:
                tok, total = x.argmax(dim=-1), w.sum(-1)
            else:
                tok, total = _invert_cdf(w, u[e])
                if any_greedy:
                    tok = torch.where(batch.greedy[e], x.argmax(dim=-1), tok)
            tokens[e] = tok
            x_tok = x.gather(1, tok[:, None])
            if not t1:  # the trainer's division, on the one logit needed (max(x / T) = max(x) / T exactly)
                x_tok, mx = x_tok / temps, mx / temps
            logprobs[e] = (x_tok - mx).squeeze(1) - total.log()
        return SamplerOutput(tokens, logprobs)

    def _fused_plain(self, logits: torch.Tensor, batch: SamplingBatch, u: torch.Tensor) -> SamplerOutput:
        """`_plain` as one kernel launch: no filters, so the kernel's thresholds are all off."""
        off = torch.zeros(batch.rows, dtype=torch.int32, device=logits.device)
        tokens, logprobs = self.fused(logits, batch.temperature, batch.greedy, off, torch.ones_like(u),
                                      torch.zeros_like(u), u)
        return SamplerOutput(tokens, logprobs)

    @staticmethod
    def _report(batch: SamplingBatch, e: slice, x, policy, dist, probs, filtered) -> torch.Tensor:
        """The [chunk, vocab] logprobs each row reports, by its mode."""
        modes = batch.modes
        if modes == {"policy"}:
            return policy
        sampling = (probs / probs.sum(-1, keepdim=True)).log() if filtered else dist
        if modes == {"sampling"}:
            return sampling
        raw = torch.log_softmax(x, dim=-1) if "raw" in modes else None
        if modes == {"raw"}:
            return raw
        mode = batch.mode[e, None]
        out = policy
        if "sampling" in modes:
            out = torch.where(mode == 1, sampling, out)
        if raw is not None:
            out = torch.where(mode == 2, raw, out)
        return out


def prompt_logprobs(logits: torch.Tensor, targets: torch.Tensor, params, k: int):
    """Logprobs of `targets` [rows] under `logits` [rows, vocab] in `params`' mode, plus the top `k`."""
    t = 1.0 if params.logprobs_mode == "raw" or params.temperature == 0 else params.temperature
    lp = torch.log_softmax(logits / t, dim=-1) if t != 1.0 else torch.log_softmax(logits, dim=-1)
    sel = lp.gather(1, targets[:, None]).squeeze(1)
    if k:
        vals, ids = torch.topk(lp, k, dim=-1)
        return sel, ids, vals
    return sel, None, None
