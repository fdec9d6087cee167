"""Decode steps replayed as CUDA graphs: one graph per padded batch size, captured on first use.

A decode-only step of n sequences (one new token each, no prompt logprobs) runs as the graph of the
smallest captured size >= n. The step's inputs are copied into static buffers (token ids, positions,
slots, block tables, context lengths) and the graph replays the whole forward, attention kernels
and LM head, into a static logits buffer. Padding rows write their K/V into a scratch block that
the block manager never hands out and attend to it alone, so they touch no sequence's cache.
Steps with prefill chunks, prompt logprobs or more sequences than the largest size run eagerly.

A graph reads the weights and the KV cache at the addresses it was captured with. In-place updates
(`copy_`, an optimizer step on the trainer's module) keep the addresses, so the next replay sees
them. A double-buffered update or `sleep(level=2)` moves them, so graphs are filed under the data
addresses of every parameter and buffer and of the KV cache, looked up before each replay: a step
never replays a graph over storage the model no longer uses. Graphs of the two most recent address
sets are kept, the two that double-buffered updates alternate between.
"""

import bisect

import torch

from .attention import PagedAttentionMetadata

MAX_CAPTURE_SIZE = 512  # larger decode batches gain little from graphs and would cost memory per size


def use_cuda_graphs(requested: bool | None, device: torch.device | str, attention_backend: str) -> bool:
    """Whether decode steps run as CUDA graphs, for `EngineConfig.cuda_graphs=requested` (None: auto).

    Graphs need the model on CUDA and the Triton attention kernels: those read only a sequence's own
    blocks, while the torch reference decode gathers every column of the padded block table. A
    requested True that cannot hold raises ValueError saying why.
    """
    device = torch.device(device)
    if requested is False:
        return False
    if requested is None:
        return device.type == "cuda" and attention_backend == "triton"
    if device.type != "cuda":
        raise ValueError(f"cuda_graphs=True needs the model on a CUDA device (it is on {device})")
    if attention_backend != "triton":
        raise ValueError(f"cuda_graphs=True needs the Triton attention kernels (attention_backend='triton', or "
                         f"'auto' with triton installed and block_size a power of two >= 16); the "
                         f"'{attention_backend}' backend was chosen")
    return True


def capture_sizes(max_num_seqs: int) -> list[int]:
    """The batch sizes graphs are captured for, ascending: 1, 2, 4, 8, then every 16, up to the largest batch."""
    top = min(max_num_seqs, MAX_CAPTURE_SIZE)
    return [s for s in (1, 2, 4, 8) if s < top] + [s for s in range(16, top, 16)] + [top]


def padded_size(num_seqs: int, sizes: list[int]) -> int | None:
    """The smallest of `sizes` (ascending) holding `num_seqs` rows; None when none does."""
    i = bisect.bisect_left(sizes, num_seqs)
    return sizes[i] if i < len(sizes) else None


def data_addresses(tensors) -> tuple[int, ...]:
    """Where each tensor's data is: equal tuples mean a graph captured over them reads them now."""
    return tuple(t.data_ptr() for t in tensors)


class GraphCache:
    """Graphs by (address set, batch size), for the `max_address_sets` address sets used most recently."""

    def __init__(self, max_address_sets: int = 2):
        self.max_address_sets = max_address_sets
        self._sets: dict[tuple, dict[int, object]] = {}  # least recently used first

    def get(self, addresses: tuple, size: int):
        graphs = self._sets.pop(addresses, None)
        if graphs is None:
            return None
        self._sets[addresses] = graphs
        return graphs.get(size)

    def put(self, addresses: tuple, size: int, graph) -> None:
        if addresses not in self._sets:
            while len(self._sets) >= self.max_address_sets:
                del self._sets[next(iter(self._sets))]  # its graphs go, and their memory with them
            self._sets[addresses] = {}
        self._sets[addresses][size] = graph

    @property
    def num_address_sets(self) -> int:
        return len(self._sets)

    def __len__(self) -> int:
        return sum(len(graphs) for graphs in self._sets.values())


class StaticDecodeInputs:
    """The buffers decode graphs read. After `fill(..., size)` rows [0, n) hold the step and rows
    [n, size) are padding: token 0 at position 0, written to and attending only the scratch block."""

    def __init__(self, max_size: int, max_blocks: int, scratch_block: int, block_size: int, device):
        self.max_size, self.max_blocks = max_size, max_blocks
        self.scratch_block, self.scratch_slot = scratch_block, scratch_block * block_size
        long = dict(dtype=torch.long, device=device)
        self.input_ids = torch.zeros(max_size, **long)
        self.positions = torch.zeros(max_size, **long)
        self.slot_mapping = torch.full((max_size,), self.scratch_slot, **long)
        self.block_tables = torch.full((max_size, max_blocks), scratch_block, **long)
        self.context_lens = torch.ones(max_size, **long)

    def holds(self, meta: PagedAttentionMetadata, num_tokens: int) -> bool:
        """Whether a step of `num_tokens` tokens with `meta` is all decodes and fits the buffers."""
        return (not meta.prefill_query_lens and meta.num_decodes == num_tokens <= self.max_size
                and meta.decode_block_tables.shape[1] <= self.max_blocks)

    def fill(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PagedAttentionMetadata, size: int) -> None:
        n, width = len(input_ids), meta.decode_block_tables.shape[1]
        self.input_ids[:n].copy_(input_ids)
        self.positions[:n].copy_(positions)
        self.slot_mapping[:n].copy_(meta.slot_mapping)
        self.block_tables[:n, :width].copy_(meta.decode_block_tables)  # columns past `width` are never read
        self.context_lens[:n].copy_(meta.decode_context_lens)
        # Padding rows are reset every step: a row left from a larger batch would write K/V into a slot
        # whose block may belong to another sequence by now.
        self.input_ids[n:size].zero_()
        self.positions[n:size].zero_()
        self.slot_mapping[n:size].fill_(self.scratch_slot)
        self.block_tables[n:size].fill_(self.scratch_block)
        self.context_lens[n:size].fill_(1)

    def metadata(self, size: int, kv_cache, ops) -> PagedAttentionMetadata:
        """Attention metadata over the first `size` rows (views: a graph captured with it reads the buffers)."""
        return PagedAttentionMetadata(
            kv_cache=kv_cache, ops=ops, slot_mapping=self.slot_mapping[:size], num_decodes=size,
            decode_block_tables=self.block_tables[:size], decode_context_lens=self.context_lens[:size],
            prefill_query_lens=[], prefill_context_lens=[], prefill_block_tables=None)


class DecodeGraphs:
    """Runs a `ModelRunner`'s decode-only steps as CUDA graphs (see the module docstring).

    `runner.kv_cache` has one block more than the block manager hands out: `scratch_block`.
    """

    def __init__(self, runner, sizes: list[int], max_blocks: int, scratch_block: int):
        self.runner = runner
        self.sizes = sizes
        self.inputs = StaticDecodeInputs(sizes[-1], max_blocks, scratch_block, runner.block_size, runner.device)
        self.graphs = GraphCache()
        self.num_captures = 0
        self._tensors = list(runner.model.parameters()) + list(runner.model.buffers())
        self._pool = None  # one memory pool for every graph: they never run concurrently
        self._logits = None  # [sizes[-1], vocab] float32, every graph's output; made at the first capture

    def release(self) -> None:
        """Drops every graph and its memory (the engine sleeps); the next decode steps capture again."""
        self.graphs = GraphCache()
        self._pool = self._logits = None

    def fits(self, meta: PagedAttentionMetadata, num_tokens: int, prompt_rows) -> bool:
        return not prompt_rows and self.inputs.holds(meta, num_tokens)

    def run(self, input_ids: torch.Tensor, positions: torch.Tensor, meta: PagedAttentionMetadata,
            logits_rows: list[int]) -> torch.Tensor:
        """What `runner.forward` returns for this decode-only step, by replaying a graph."""
        n = len(input_ids)
        size = padded_size(n, self.sizes)
        self.inputs.fill(input_ids, positions, meta, size)
        addresses = data_addresses(self._tensors) + (self.runner.kv_cache.data.data_ptr(),)
        graph = self.graphs.get(addresses, size)
        with torch.cuda.device(self.runner.device):  # capture and replay on the model's GPU's current stream
            if graph is None:
                graph = self._capture(size)
                self.graphs.put(addresses, size, graph)
            with self.runner.model_modes():
                graph.replay()
        keep = [r for r in logits_rows if r >= 0]  # decode rows: row i is i, or -1 mid-recompute
        if len(keep) == n:
            return self._logits[:n].clone()
        return self._logits[torch.tensor(keep, dtype=torch.long, device=self._logits.device)]

    def _capture(self, size: int) -> "torch.cuda.CUDAGraph":
        inputs = self.inputs
        meta = inputs.metadata(size, self.runner.kv_cache, self.runner.attention_ops)

        def forward():
            return self.runner.call_model(inputs.input_ids[:size], inputs.positions[:size], meta, 0)

        # Warm-up outside the graph, on a side stream as capture wants: compiles the Triton kernels and
        # sizes library workspaces. It writes the step's K/V, which the replay writes again unchanged.
        stream = torch.cuda.Stream(device=self.runner.device)
        stream.wait_stream(torch.cuda.current_stream(self.runner.device))
        with torch.cuda.stream(stream):
            logits = forward()
        torch.cuda.current_stream(self.runner.device).wait_stream(stream)
        if self._logits is None:
            self._logits = torch.empty(self.sizes[-1], logits.shape[-1], dtype=torch.float32,
                                       device=self.runner.device)
        del logits
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        # thread_local: a double-buffered weight update may be copying on another thread meanwhile
        with torch.cuda.graph(graph, pool=self._pool, capture_error_mode="thread_local"):
            self._logits[:size].copy_(forward())
        self.num_captures += 1
        return graph
