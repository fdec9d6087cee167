"""The paged KV cache's memory: zeroed, and on Linux advised to transparent huge pages."""

import sys

import pytest
import torch

from rollserve.engine.kv_cache import HUGE_PAGE, PagedKVCache, advise_huge_pages


def _vm_flags(address: int) -> list[str]:
    """The VmFlags of the mapping of this process holding `address` (/proc/self/smaps)."""
    inside = False
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                lo, hi = (int(x, 16) for x in head.split("-"))
                inside = lo <= address < hi
            elif inside and head == "VmFlags:":
                return line.split()[1:]
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise(MADV_HUGEPAGE) is Linux's")
def test_cache_is_zeroed_and_its_aligned_interior_advised_to_huge_pages():
    cache = PagedKVCache(2, 128, 16, 4, 64, torch.float32, torch.device("cpu"))  # 2 x 2 x 128 x 16 KiB = 8 MiB
    assert torch.count_nonzero(cache.data) == 0
    start, length = cache.huge_pages
    begin = cache.data.data_ptr()
    end = begin + cache.data.numel() * cache.data.element_size()
    assert start % HUGE_PAGE == 0 and length % HUGE_PAGE == 0 and length >= 2 * HUGE_PAGE
    assert begin <= start and start + length <= end and start - begin < HUGE_PAGE and end - start - length < HUGE_PAGE
    assert "hg" in _vm_flags(start) and "hg" in _vm_flags(start + length - 1)
    k, v = cache.layer(1)
    k[3] = 1.0
    assert torch.count_nonzero(cache.data) == k[3].numel() and torch.count_nonzero(v) == 0


def test_nothing_is_advised_under_a_huge_page():
    assert advise_huge_pages(torch.zeros(1000)) == (0, 0)
