"""Packs a scheduled batch into one varlen row, runs the model (the lean forward or the HF module), returns logits."""

from contextlib import contextmanager, nullcontext

import torch

from ..kernels.backend import attention_ops, choose_attention_backend
from ..kernels.cpu_gemm import CpuGemm
from .attention import ATTENTION_NAME, PagedAttentionMetadata, register
from .cuda_graphs import DecodeGraphs, capture_sizes, use_cuda_graphs
from .kv_cache import PagedKVCache
from .lean_forward import LeanForward
from .scheduler import SchedulerOutput


def kv_cache_geometry(config) -> tuple[int, int, int]:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    num_heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // num_heads
    num_kv_heads = getattr(text, "num_key_value_heads", None) or num_heads
    return text.num_hidden_layers, num_kv_heads, head_dim


@contextmanager
def _paged_attention(configs: list):
    """Route the model's attention through the paged function for one forward; the trainer's setting is restored."""
    saved = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = ATTENTION_NAME
        yield
    finally:
        for c, impl in zip(configs, saved):
            c._attn_implementation = impl


@contextmanager
def _eval_mode(model):
    """Generation never sees a trainer's train-mode behaviour (dropout, checkpointing) or its autocast."""
    training = [m for m in model.modules() if m.training]
    device = next(model.parameters()).device.type
    try:
        for m in training:
            m.training = False
        with torch.autocast(device, enabled=False):  # the KV cache holds the model's dtype
            yield
    finally:
        for m in training:
            m.training = True


class ModelRunner:
    def __init__(self, model, num_blocks: int, block_size: int, attention_backend: str,
                 cuda_graphs: bool | None, max_num_seqs: int, max_model_len: int,
                 kv_dtype: torch.dtype | None = None):
        register()
        self.model = model
        self.block_size = block_size
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.kv_dtype = kv_dtype or self.dtype  # a 16-bit cache under fp32 weights: EngineConfig.kv_cache_dtype
        backend = choose_attention_backend(attention_backend, self.device, block_size)
        if backend == "triton" and self.kv_dtype != self.dtype:
            raise ValueError(f"EngineConfig.kv_cache_dtype={self.kv_dtype} is invalid with "
                             f"attention_backend='triton': its kernels read a cache of the model's dtype "
                             f"({self.dtype}); use 'auto' or 'torch'")
        self.attention_ops = attention_ops(backend)
        graphs = use_cuda_graphs(cuda_graphs, self.device, backend)
        num_layers, num_kv_heads, head_dim = kv_cache_geometry(model.config)
        # With graphs, block `num_blocks` (never handed out) takes the K/V of a padded batch's padding rows.
        self._kv_shape = (num_layers, num_blocks + int(graphs), block_size, num_kv_heads, head_dim)
        self.kv_cache = self._new_kv_cache()
        configs = {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}
        self._attn_configs = [c for c in configs.values() if hasattr(c, "_attn_implementation")]
        self._gemm = CpuGemm.for_model(self.dtype, self.device)
        self._lean = LeanForward.for_model(model, self._gemm)
        max_blocks = min(-(-max_model_len // block_size), num_blocks)
        self.decode_graphs = (DecodeGraphs(self, capture_sizes(max_num_seqs), max_blocks, scratch_block=num_blocks)
                              if graphs else None)

    def weights_changed(self) -> None:
        """New weights are in place: copies derived from them are rebuilt before the next forward."""
        if self._gemm is not None:
            self._gemm.invalidate()

    def _new_kv_cache(self) -> PagedKVCache:
        num_layers, num_blocks, block_size, num_kv_heads, head_dim = self._kv_shape
        return PagedKVCache(num_layers, num_blocks, block_size, num_kv_heads, head_dim, self.kv_dtype, self.device)

    def release_kv_cache(self) -> None:
        self.kv_cache = None
        if self.decode_graphs is not None:
            self.decode_graphs.release()

    def allocate_kv_cache(self) -> None:
        if self.kv_cache is None:
            self.kv_cache = self._new_kv_cache()

    @staticmethod
    def bytes_per_block(config, block_size: int, dtype: torch.dtype) -> int:
        num_layers, num_kv_heads, head_dim = kv_cache_geometry(config)
        return 2 * num_layers * block_size * num_kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()

    def _slots(self, block_table: list[int], start: int, end: int) -> list[int]:
        bs = self.block_size
        return [block_table[p // bs] * bs + p % bs for p in range(start, end)]

    def _block_tables(self, seqs) -> torch.Tensor | None:
        """[len(seqs), max_blocks] int64, each row padded with block 0; None for no sequences."""
        if not seqs:
            return None
        width = max(len(s.block_table) for s in seqs)
        return torch.tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs],
                            dtype=torch.long, device=self.device)

    def prepare(self, batch: SchedulerOutput):
        """Returns (input_ids, positions, metadata, logits_rows, order, prompt_rows) for `batch`.

        `order` lists the scheduled sequences in packed order (decodes first);
        `logits_rows[i]` is the packed token whose logits sequence `order[i]`
        needs, or -1 when it is mid-prefill. `prompt_rows` lists
        `(seq, first_packed_row, first_position, count)` for sequences that
        want prompt logprobs: the logits at those prompt positions.
        """
        dev, bs = self.device, self.block_size
        pairs = list(zip(batch.seqs, batch.num_new_tokens))
        decodes = [s for s, n in pairs if n == 1]
        prefills = [(s, n) for s, n in pairs if n > 1]
        # Decodes: one token each at position num_computed_tokens; slots from the block table tensor.
        pos = [s.num_computed_tokens for s in decodes]
        ids = [s.token_ids[p] for s, p in zip(decodes, pos)]
        rows = [i if p + 1 == s.num_tokens else -1 for i, (s, p) in enumerate(zip(decodes, pos))]
        decode_tables = self._block_tables(decodes)
        slots, query_lens, context_lens, prompt_rows = [], [], [], []
        for seq, n in prefills:
            start, p = len(ids), seq.num_computed_tokens
            ids.extend(seq.token_ids[p:p + n])
            pos.extend(range(p, p + n))
            slots.extend(self._slots(seq.block_table, p, p + n))
            query_lens.append(n)
            context_lens.append(p + n)
            if seq.skip_prefix_cache:  # wants prompt logprobs: positions q predict prompt token q + 1
                first, last = max(p, seq.num_prompt_logprobs), min(p + n, seq.num_prompt_tokens - 1)
                if last > first:
                    prompt_rows.append((seq, start + first - p, first, last - first))
            rows.append(len(ids) - 1 if p + n == seq.num_tokens else -1)
        positions = torch.tensor(pos, dtype=torch.long, device=dev)
        slot_mapping = torch.tensor(slots, dtype=torch.long, device=dev)
        decode_context_lens = None
        if decodes:
            nd = len(decodes)
            p = positions[:nd]
            decode_slots = decode_tables.gather(1, (p // bs)[:, None]).squeeze(1) * bs + p % bs
            slot_mapping = torch.cat([decode_slots, slot_mapping])
            decode_context_lens = p + 1
        meta = PagedAttentionMetadata(
            kv_cache=self.kv_cache,
            ops=self.attention_ops,
            slot_mapping=slot_mapping,
            num_decodes=len(decodes),
            decode_block_tables=decode_tables,
            decode_context_lens=decode_context_lens,
            prefill_query_lens=query_lens,
            prefill_context_lens=context_lens,
            prefill_block_tables=self._block_tables([s for s, _ in prefills]),
        )
        input_ids = torch.tensor(ids, dtype=torch.long, device=dev)
        order = decodes + [s for s, _ in prefills]
        return input_ids, positions, meta, rows, order, prompt_rows

    @torch.inference_mode()
    def forward(self, input_ids, positions, meta, logits_rows: list[int], prompt_rows=()) -> torch.Tensor:
        """One packed forward; returns float32 logits for rows >= 0, then for each `prompt_rows` range."""
        keep = [r for r in logits_rows if r >= 0]
        for _, first, _, count in prompt_rows:
            keep.extend(range(first, first + count))
        keep = torch.tensor(keep, dtype=torch.long, device=self.device)
        return self.call_model(input_ids, positions, meta, keep)

    @contextmanager
    def model_modes(self):
        """What the model runs under in an engine step (paged attention, eval mode, the packed CPU GEMMs)."""
        gemm = nullcontext() if self._gemm is None else self._gemm.on_linear_modules(self.model)
        with _paged_attention(self._attn_configs), _eval_mode(self.model), gemm:
            yield

    def call_model(self, input_ids, positions, meta, logits_to_keep) -> torch.Tensor:
        """The model on one packed row; float32 logits of the rows `logits_to_keep` (a tensor, or 0: all).

        The lean forward where it applies this step (`engine.lean_forward`), else the HF module.
        """
        if self._lean is not None and self._lean.applies():
            with _eval_mode(self.model):
                return self._lean(input_ids, positions, meta, logits_to_keep).float()
        with self.model_modes():
            out = self.model(
                input_ids=input_ids[None],
                position_ids=positions[None],
                rollserve_meta=meta,
                logits_to_keep=logits_to_keep,
                use_cache=False,
            )
        return out.logits[0].float()

    @torch.inference_mode()
    def run(self, batch: SchedulerOutput):
        if batch.block_copies:
            src, dst = zip(*batch.block_copies)
            self.kv_cache.copy_blocks(torch.tensor(src, device=self.device), torch.tensor(dst, device=self.device))
        input_ids, positions, meta, rows, order, prompt_rows = self.prepare(batch)
        if self.decode_graphs is not None and self.decode_graphs.fits(meta, len(input_ids), prompt_rows):
            return self.decode_graphs.run(input_ids, positions, meta, rows), rows, order, prompt_rows
        return self.forward(input_ids, positions, meta, rows, prompt_rows), rows, order, prompt_rows
