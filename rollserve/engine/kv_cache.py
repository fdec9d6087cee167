"""The paged KV cache: one tensor holding every layer's K and V blocks."""

import torch


class PagedKVCache:
    """Block storage for all layers; a layer's K (or V) is `[num_blocks, block_size, num_kv_heads, head_dim]`,
    the layout the ops in `rollserve.kernels` read and write."""

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, num_kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device):
        # [layers, k/v, blocks, block_size, kv_heads, head_dim]
        self.data = torch.zeros(num_layers, 2, num_blocks, block_size, num_kv_heads, head_dim,
                                dtype=dtype, device=device)

    def layer(self, idx: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.data[idx, 0], self.data[idx, 1]

    def copy_blocks(self, src: torch.Tensor, dst: torch.Tensor) -> None:
        self.data[:, :, dst] = self.data[:, :, src]
