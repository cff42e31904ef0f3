"""Turns one step's scheduled sequences into batch tensors and runs the model (section 4.3).

Continuous batching (section 4.2, Orca's iteration-level scheduling) means every step
mixes sequences at different points of their lives: some bring a whole prompt (or a
chunk of one), most bring a single decode token. The runner flattens all new tokens
into one batch and builds, per token, its position and its cache *slot*, and per
sequence, its block table and context length. The model never sees a request: only
this flat batch and the `AttentionMetadata`.

Invariant: the slot of the token at position p of a sequence is
`block_table[p // B] * B + p % B` — the same formula the block manager, the kernels
and the NumPy reference use.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from minipaged.attention.base import AttentionBackend, AttentionMetadata


@dataclass
class BatchItem:
    """One sequence's share of a step, as plain data.

    token_ids: the tokens whose K/V this step computes (a prompt, a chunk, or one token);
    start_pos: the position of the first of them (the tokens before are already cached);
    block_table: the sequence's physical blocks, covering start_pos + len(token_ids) slots;
    needs_logits: sample after this step (False for a non-final prefill chunk).
    extra_logit_rows: the logits of this many of its first rows are wanted too (a
    request's prompt logprobs: row i's logits predict token i + 1);
    argmax_only: its sampled row needs only the argmax token of its logits (a greedy row
    that reports no logprobs): the runner answers with that token, not a row of logits.
    """

    token_ids: list[int]
    start_pos: int
    block_table: list[int]
    needs_logits: bool = True
    extra_logit_rows: int = 0
    argmax_only: bool = False


class ModelOutput(NamedTuple):
    """What a step's forward pass gives back. logits [rows, V] float32: one row per item
    that samples and is not argmax_only, then each item's extra rows, in item order;
    argmax_tokens: the token of each argmax_only item that samples, in item order."""

    logits: torch.Tensor
    argmax_tokens: list[int]


def build_metadata(items: list[BatchItem], block_size: int, device: torch.device | str = "cpu"
                   ) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor]:
    """(input_ids, positions, metadata, logits_indices) for a list of batch items:
    logits_indices, the rows the model must return: the sampled rows of argmax_only
    items, then the other sampled rows, then the extra rows (see BatchItem).

    Items with one new token must come first (decodes, then prefills): the attention
    backend runs the decode kernel on that leading run and the prefill kernel on the rest.
    """
    if not items:
        raise ValueError("items: a step needs at least one sequence")
    query_lens = np.array([len(it.token_ids) for it in items], dtype=np.int64)
    starts = np.array([it.start_pos for it in items], dtype=np.int64)
    context_lens = starts + query_lens
    query_start_loc = np.zeros(len(items) + 1, dtype=np.int64)
    np.cumsum(query_lens, out=query_start_loc[1:])

    input_ids = np.fromiter((t for it in items for t in it.token_ids), dtype=np.int64,
                            count=int(query_start_loc[-1]))
    # positions: start_pos .. start_pos + len - 1 for each item, vectorised
    seq_of_token = np.repeat(np.arange(len(items)), query_lens)
    positions = np.arange(len(input_ids)) - query_start_loc[seq_of_token] + starts[seq_of_token]

    max_blocks = max(len(it.block_table) for it in items)
    block_tables = np.zeros((len(items), max_blocks), dtype=np.int32)
    for i, it in enumerate(items):
        block_tables[i, :len(it.block_table)] = it.block_table
    slot_mapping = (block_tables[seq_of_token, positions // block_size].astype(np.int64)
                    * block_size + positions % block_size)

    num_decode_seqs = 0
    while num_decode_seqs < len(items) and query_lens[num_decode_seqs] == 1:
        num_decode_seqs += 1
    # A one-token item after a prefill is still correct (the prefill kernel handles it);
    # only the leading run goes to the decode kernel.
    # The sampled rows (one per item that samples; argmax_only items first), then the
    # extra rows, item by item.
    sampled = [i for i, it in enumerate(items) if it.needs_logits]
    logits_indices = np.array([query_start_loc[i + 1] - 1 for i in sampled if items[i].argmax_only]
                              + [query_start_loc[i + 1] - 1 for i in sampled
                                 if not items[i].argmax_only]
                              + [query_start_loc[i] + j for i, it in enumerate(items)
                                 for j in range(it.extra_logit_rows)], dtype=np.int64)

    def t(a: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
        return torch.from_numpy(a).to(device=device, dtype=dtype)

    meta = AttentionMetadata(
        slot_mapping=t(slot_mapping, torch.int64),
        block_tables=t(block_tables, torch.int32),
        context_lens=t(context_lens, torch.int32),
        query_start_loc=t(query_start_loc, torch.int32),
        max_query_len=int(query_lens.max()),
        max_context_len=int(context_lens.max()),
        num_decode_seqs=num_decode_seqs,
    )
    return t(input_ids, torch.int64), t(positions, torch.int64), meta, t(logits_indices,
                                                                          torch.int64)


class ModelRunner:
    """Runs the model on a step's batch: the argmax token of each argmax_only row, fp32
    logits for the other rows to sample (and the extra rows some items ask for)."""

    def __init__(self, model: torch.nn.Module, block_size: int, backend: AttentionBackend,
                 device: torch.device | str = "cpu") -> None:
        self.model = model
        self.block_size = block_size
        self.backend = backend
        self.device = torch.device(device)

    @torch.inference_mode()
    def execute(self, items: list[BatchItem],
                kv_caches: list[tuple[torch.Tensor, torch.Tensor]]) -> ModelOutput:
        """Forward the batch through the paged cache (see ModelOutput)."""
        input_ids, positions, meta, logits_indices = build_metadata(items, self.block_size,
                                                                    self.device)
        num_argmax = sum(1 for it in items if it.needs_logits and it.argmax_only)
        num_sampled = sum(1 for it in items if it.needs_logits)
        order = None
        # rows in item order are sorted already (a pure decode step); only a step that
        # mixes argmax_only rows with others, or has extra rows, needs the sort
        if 0 < num_argmax < num_sampled or any(it.extra_logit_rows for it in items):
            # the model takes its rows sorted; put them back in build_metadata's order
            logits_indices, order = logits_indices.sort()
        # only the wanted rows come back: the last layer computes nothing else
        hidden = self.model(input_ids, positions, kv_caches, meta, self.backend,
                            output_rows=logits_indices)
        if order is not None:
            hidden = hidden[order.argsort()]
        tokens: list[int] = []
        if num_argmax:
            greedy = getattr(self.model, "greedy_tokens", None)
            h = hidden[:num_argmax]
            found = greedy(h) if greedy is not None else self.model.compute_logits(h).argmax(-1)
            tokens = found.tolist()
        if logits_indices.numel() == num_argmax:
            return ModelOutput(torch.empty((0, 0), dtype=torch.float32), tokens)
        return ModelOutput(self.model.compute_logits(hidden[num_argmax:]).float(), tokens)
