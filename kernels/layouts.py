"""Two ways to write down a paged KV cache's addressing (paper section 4.1, Fig. 6).

The paper's block table is one idea with two common encodings:

* the **padded block table** of vLLM (and of minipaged): a rectangle
  `block_tables [num_seqs, max_blocks]`, row i listing sequence i's physical blocks and
  padded with 0, plus `context_lens [num_seqs]` (tokens per sequence);
* the **CSR form** of FlashInfer and of FlashAttention's paged varlen API: all block ids
  in one flat array `kv_indices`, sequence i owning `kv_indices[kv_indptr[i]:kv_indptr[i+1]]`,
  and `kv_last_page_len [num_seqs]` (how many tokens the last block of each holds) in
  place of the context length.

The same three sequences (block size B = 4; contexts of 6, 1 and 8 tokens) both ways:

    padded block table                      CSR
    ------------------                      ---
    block_tables = [[7, 2],                 kv_indptr        = [0, 2, 3, 5]
                    [5, 0],   <- padding    kv_indices       = [7, 2, 5, 0, 3]
                    [0, 3]]                 kv_last_page_len = [2, 1, 4]
    context_lens = [6, 1, 8]

Sequence 2 really owns block 0 (a physical id like any other), which is why padding can
never be told apart from data without `context_lens`: a kernel must only read blocks
below ceil(context_len / B). The padded form costs num_seqs * max_blocks ids and is
easy to index on a GPU (row i, column t // B); the CSR form stores exactly the blocks in
use, which matters when lengths are very uneven.

Invariant: context_len = (num_pages - 1) * B + last_page_len, with 1 <= last_page_len <= B
for every sequence that owns a page (an empty sequence has no pages and last_page_len 0).
"""

from __future__ import annotations

import numpy as np


def _pages(context_lens: np.ndarray, block_size: int) -> np.ndarray:
    """Blocks a sequence of each length occupies: ceil(context_len / B)."""
    return -(-context_lens // block_size)


def block_table_to_csr(block_tables: np.ndarray, context_lens: np.ndarray, block_size: int,
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Padded block table -> (kv_indptr [S+1], kv_indices [total_pages], kv_last_page_len [S]).

    Only the first ceil(context_len / B) entries of each row are kept; the padding goes.
    All three outputs are int32.
    """
    block_tables = np.asarray(block_tables)
    context_lens = np.asarray(context_lens).astype(np.int64)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if block_tables.ndim != 2 or len(block_tables) != len(context_lens):
        raise ValueError("block_tables must be [num_seqs, max_blocks] with one row per "
                         f"entry of context_lens; got {block_tables.shape} and "
                         f"{context_lens.shape}")
    if (context_lens < 0).any():
        raise ValueError("context_lens must be >= 0")
    pages = _pages(context_lens, block_size)
    if len(pages) and pages.max() > block_tables.shape[1]:
        raise ValueError(f"block_tables has {block_tables.shape[1]} columns but context_lens "
                         f"needs {pages.max()} blocks of size {block_size}")
    kv_indptr = np.concatenate([[0], np.cumsum(pages)]).astype(np.int32)
    # Row-major boolean mask: keeps each row's first `pages[i]` ids, in order.
    in_use = np.arange(block_tables.shape[1])[None, :] < pages[:, None]
    kv_indices = block_tables[in_use].astype(np.int32)
    kv_last_page_len = np.where(pages > 0, context_lens - (pages - 1) * block_size, 0)
    return kv_indptr, kv_indices, kv_last_page_len.astype(np.int32)


def csr_to_block_table(kv_indptr: np.ndarray, kv_indices: np.ndarray,
                       kv_last_page_len: np.ndarray, block_size: int,
                       ) -> tuple[np.ndarray, np.ndarray]:
    """CSR -> (block_tables [S, max_pages] padded with 0, context_lens [S]), both int32."""
    kv_indptr = np.asarray(kv_indptr).astype(np.int64)
    kv_indices = np.asarray(kv_indices)
    kv_last_page_len = np.asarray(kv_last_page_len).astype(np.int64)
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    if kv_indptr.ndim != 1 or len(kv_indptr) != len(kv_last_page_len) + 1:
        raise ValueError("kv_indptr must have one more entry than kv_last_page_len")
    pages = np.diff(kv_indptr)
    if kv_indptr[0] != 0 or (pages < 0).any() or kv_indptr[-1] != len(kv_indices):
        raise ValueError("kv_indptr must start at 0, never decrease and end at "
                         f"len(kv_indices) = {len(kv_indices)}")
    has_pages = pages > 0
    if ((has_pages & ((kv_last_page_len < 1) | (kv_last_page_len > block_size))).any()
            or (~has_pages & (kv_last_page_len != 0)).any()):
        raise ValueError("kv_last_page_len must be in 1..block_size for a sequence with "
                         "pages and 0 for one without")
    num_seqs = len(pages)
    block_tables = np.zeros((num_seqs, int(pages.max(initial=0))), dtype=np.int32)
    in_use = np.arange(block_tables.shape[1])[None, :] < pages[:, None]
    block_tables[in_use] = kv_indices
    context_lens = np.where(has_pages, (pages - 1) * block_size + kv_last_page_len, 0)
    return block_tables, context_lens.astype(np.int32)
