"""Continuous batching with preemption (paper section 4.5, and Orca's iteration-level batching).

Every engine step the scheduler decides, in first-come-first-served order, which
sequence groups run and how many new tokens each computes:

1. the running groups grow by one decode token per sequence (or the next chunk of an
   unfinished prompt). When the free blocks cannot cover that growth, the *latest*
   running group is preempted, all or nothing (a group's sequences share memory, so
   they leave together): swapped to host memory, or freed and later recomputed;
2. if nothing was preempted, swapped-out groups come back first (they are older);
3. then, if no group is still swapped out, waiting groups are admitted while their
   prompt fits (the block manager's watermark keeps room for the running ones to grow).

Each sequence computes `seq.get_len() - seq.num_computed_tokens` tokens, at most the
step's token budget. That one rule covers a fresh prompt, a prompt after a prefix-cache
hit, a chunk of a long prompt, a decode, and the re-prefill of a recomputed sequence.

Invariant: the scheduler never touches a tensor. It returns plain data — which
sequences run with how many tokens, and the block pairs to swap in, swap out and copy —
and the block manager's `can_*` answers are asked before every `allocate`/`append`.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass, field

from minipaged.config import SchedulerConfig
from minipaged.core.block_manager import AllocStatus, BlockManager
from minipaged.sequence import Sequence, SequenceGroup, SequenceStatus

@dataclass
class ScheduledSeq:
    """One sequence's work this step: compute `num_new_tokens` tokens from num_computed."""

    group: SequenceGroup
    seq: Sequence
    num_new_tokens: int
    #: this chunk reaches the sequence's last token: sample after it (fixed when scheduled,
    #: since the sequence's counters move on once the step has run)
    needs_logits: bool = True


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSeq] = field(default_factory=list)   # decodes first
    blocks_to_swap_in: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_swap_out: list[tuple[int, int]] = field(default_factory=list)
    blocks_to_copy: list[tuple[int, int]] = field(default_factory=list)
    preempted: list[SequenceGroup] = field(default_factory=list)
    #: groups the scheduler ended itself: a prompt that can never fit (aborted), or a
    #: group that outgrew the whole device pool (finished as "length")
    rejected: list[SequenceGroup] = field(default_factory=list)

    @property
    def num_batched_tokens(self) -> int:
        return sum(s.num_new_tokens for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not (self.scheduled or self.blocks_to_swap_in or self.blocks_to_swap_out
                    or self.blocks_to_copy)


class Scheduler:
    def __init__(self, config: SchedulerConfig, block_manager: BlockManager) -> None:
        self.config = config
        self.block_manager = block_manager
        self.waiting: deque[SequenceGroup] = deque()
        self.running: list[SequenceGroup] = []
        self.swapped: list[SequenceGroup] = []       # kept sorted by arrival time
        self._reserved: dict[int, int] = {}          # seq_id -> slots held in the block manager
        self.num_preemptions = 0
        self.num_recompute_preemptions = 0
        self.num_swap_preemptions = 0

    # ---- queues ------------------------------------------------------------------------
    def add_group(self, group: SequenceGroup) -> None:
        self.waiting.append(group)

    def has_unfinished(self) -> bool:
        return bool(self.waiting or self.running or self.swapped)

    @property
    def num_unfinished(self) -> int:
        return len(self.waiting) + len(self.running) + len(self.swapped)

    def free_seq(self, seq: Sequence) -> None:
        """Return a finished (or dropped) sequence's blocks, wherever they are."""
        self.free_seq_id(seq.seq_id)

    def free_seq_id(self, seq_id: int) -> None:
        if self._reserved.pop(seq_id, None) is not None:
            self.block_manager.free(seq_id)

    def fork_seq(self, parent: Sequence, child: Sequence) -> None:
        """The child shares every block of the parent (section 4.4); CoW comes later."""
        self.fork_seq_by_id(parent.seq_id, child.seq_id)

    def fork_seq_by_id(self, parent_id: int, child_id: int) -> None:
        self.block_manager.fork(parent_id, child_id)
        self._reserved[child_id] = self._reserved[parent_id]

    def remove_finished(self) -> None:
        self.running = [g for g in self.running if not g.is_finished()]

    def abort(self, request_id: str) -> SequenceGroup | None:
        """Remove a request from whichever queue holds it and free all its blocks."""
        for queue in (self.waiting, self.running, self.swapped):
            for group in list(queue):
                if group.request_id == request_id:
                    queue.remove(group)
                    for seq in group.seqs:
                        self.free_seq(seq)
                        if not seq.is_finished():
                            seq.status = SequenceStatus.FINISHED_ABORTED
                    return group
        return None

    # ---- one step ----------------------------------------------------------------------
    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        token_budget = self.config.max_num_batched_tokens
        decodes: list[ScheduledSeq] = []
        prefills: list[ScheduledSeq] = []

        # 1. running groups, oldest first; preempt the newest when memory runs out
        queue = deque(self.running)
        self.running = []
        while queue:
            group = queue.popleft()
            while not self._can_grow(group):
                if not queue and not self.running:
                    # Alone on the device and still no room: it can never grow. End it as
                    # vLLM ends a full context, rather than swap it in and out forever.
                    self._truncate(group, out)
                    break
                victim = queue.pop() if queue else group
                self._preempt(victim, out)
                if victim is group:
                    break
            else:
                self._grow(group, out)
                token_budget = self._take_tokens(group, token_budget, decodes, prefills)
                self.running.append(group)

        # 2. swapped groups come back before anything new is admitted (FCFS)
        # a group counts the sequences it will run at once (best_of forks after prefill)
        num_seqs = sum(g.get_max_num_running_seqs() for g in self.running)
        if not out.preempted:
            while self.swapped and num_seqs < self.config.max_num_seqs:
                group = self.swapped[0]
                seq_ids = [s.seq_id for s in group.get_seqs(SequenceStatus.SWAPPED)]
                if not self.block_manager.can_swap_in(seq_ids):
                    break
                self.swapped.pop(0)
                out.blocks_to_swap_in += self.block_manager.swap_in(seq_ids)
                for seq in group.get_seqs(SequenceStatus.SWAPPED):
                    seq.status = SequenceStatus.RUNNING
                num_seqs += group.get_max_num_running_seqs()
                if self._can_grow(group):
                    self._grow(group, out)
                    token_budget = self._take_tokens(group, token_budget, decodes, prefills)
                self.running.append(group)

        # 3. new (or recomputed) groups, if nobody older is still waiting on the host
        if not out.preempted and not self.swapped:
            while self.waiting and token_budget > 0:
                group = self.waiting[0]
                waiting_seqs = group.get_seqs(SequenceStatus.WAITING)
                if num_seqs + group.get_max_num_running_seqs() > self.config.max_num_seqs:
                    break
                need = sum(s.get_len() for s in waiting_seqs)
                if not self.config.enable_chunked_prefill and need > token_budget:
                    break
                admitted = self._admit(group, out)
                if admitted is None:        # never fits: rejected, try the next one
                    self.waiting.popleft()
                    continue
                if not admitted:            # not now: FCFS, so nobody behind it either
                    break
                self.waiting.popleft()
                self.running.append(group)
                num_seqs += group.get_max_num_running_seqs()
                token_budget = self._take_tokens(group, token_budget, decodes, prefills)

        out.scheduled = decodes + prefills
        return out

    # ---- helpers -----------------------------------------------------------------------
    def _pending_tokens(self, seq: Sequence) -> list[int]:
        """Tokens of the sequence that have no slot yet (normally the last sampled one)."""
        missing = seq.get_len() - self._reserved[seq.seq_id]
        if missing <= 0:
            return []
        if missing <= seq.get_output_len():      # the usual case: the newest outputs,
            return seq.output_token_ids[-missing:]   # taken without copying the whole sequence
        return seq.get_token_ids()[-missing:]

    def _can_grow(self, group: SequenceGroup) -> bool:
        seqs = [s for s in group.get_seqs(SequenceStatus.RUNNING)
                if seq_needs_slots(s, self._reserved)]
        if not seqs:
            return True
        new = max(s.get_len() - self._reserved[s.seq_id] for s in seqs)
        return self.block_manager.can_append_slots([s.seq_id for s in seqs], new)

    def _grow(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        for seq in group.get_seqs(SequenceStatus.RUNNING):
            pending = self._pending_tokens(seq)
            if pending:
                out.blocks_to_copy += self.block_manager.append_slots(seq.seq_id, pending)
                self._reserved[seq.seq_id] = seq.get_len()

    def _take_tokens(self, group: SequenceGroup, budget: int, decodes: list[ScheduledSeq],
                     prefills: list[ScheduledSeq]) -> int:
        # prompt logprobs: no prefix-cache entries either (its blocks may twin cached ones)
        caching = self.block_manager.enable_prefix_caching and group.prompt_logprobs is None
        for seq in group.get_seqs(SequenceStatus.RUNNING):
            remaining = seq.get_len() - seq.num_computed_tokens
            n = min(remaining, budget)
            if n <= 0:
                continue
            budget -= n
            if caching:
                # Register the blocks this step fills as prefix-cache entries now, not
                # after the step: a request admitted later in this same step may then hit
                # them. That is safe because every layer writes the whole batch's K/V
                # before any sequence attends (AttentionBackend.forward).
                self.block_manager.mark_computed(seq.seq_id, seq.num_computed_tokens + n)
            (decodes if remaining == 1 else prefills).append(
                ScheduledSeq(group, seq, n, needs_logits=(n == remaining)))
        return budget

    def _admit(self, group: SequenceGroup, out: SchedulerOutput) -> bool | None:
        """Allocate the waiting sequences' prompts. True: admitted; False: not now;
        None: can never fit (the group is finished as rejected)."""
        seqs = group.get_seqs(SequenceStatus.WAITING)
        done: list[Sequence] = []
        use = group.prompt_logprobs is None       # prompt logprobs need every row computed
        for seq in seqs:
            status = self.block_manager.can_allocate(seq.get_token_ids(), use_cache=use)
            if status is AllocStatus.NEVER:
                for s in done:
                    self.free_seq(s)
                for s in seqs:
                    s.status = SequenceStatus.FINISHED_ABORTED
                group.error = (f"prompt of {seq.get_len()} tokens needs more KV blocks than "
                               f"the cache has ({self.block_manager.num_blocks})")
                out.rejected.append(group)
                return None
            if status is AllocStatus.LATER:
                for s in done:             # all or nothing: give back what this group took
                    self.free_seq(s)
                    s.num_computed_tokens = 0
                return False
            self.block_manager.allocate([seq.seq_id], seq.get_token_ids(), use_cache=use)
            self._reserved[seq.seq_id] = seq.get_len()
            seq.num_computed_tokens = self.block_manager.num_cached_tokens(seq.seq_id)
            if group.num_cached_tokens is None:
                group.num_cached_tokens = seq.num_computed_tokens
            done.append(seq)
        for seq in seqs:
            seq.status = SequenceStatus.RUNNING
        return True

    def _truncate(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        for seq in group.get_seqs(SequenceStatus.RUNNING):
            seq.status = SequenceStatus.FINISHED_LENGTH
            self.free_seq(seq)
        group.error = "the KV cache is too small for this request to grow further"
        out.rejected.append(group)

    def _preempt(self, group: SequenceGroup, out: SchedulerOutput) -> None:
        """All-or-nothing eviction of one group (paper section 4.5)."""
        seqs = group.get_seqs(SequenceStatus.RUNNING)
        seq_ids = [s.seq_id for s in seqs]
        # Groups whose sequences share blocks (n > 1, beam search) are swapped, as in the
        # paper: recomputing them would prefill every sequence separately.
        want_swap = self.config.preemption_mode == "swap" or len(seqs) > 1
        self.num_preemptions += 1
        if want_swap and self.block_manager.can_swap_out(seq_ids):
            out.blocks_to_swap_out += self.block_manager.swap_out(seq_ids)
            for seq in seqs:
                seq.status = SequenceStatus.SWAPPED
            bisect.insort(self.swapped, group, key=lambda g: g.arrival_time)
            self.num_swap_preemptions += 1
        else:
            for seq in seqs:
                self.free_seq(seq)
                seq.reset_for_recompute()
                seq.status = SequenceStatus.WAITING
            self.waiting.appendleft(group)
            self.num_recompute_preemptions += 1
        out.preempted.append(group)


def seq_needs_slots(seq: Sequence, reserved: dict[int, int]) -> bool:
    return seq.get_len() > reserved[seq.seq_id]
