"""When does a sequence stop? The check the engine runs after every appended token
(vLLM's StopChecker; the paper's engine frees a finished sequence's blocks at once,
section 4.3, so this decision is also what returns memory).

Invariant: check_stop looks only at the last appended token and the text it added, so
calling it once per token, in order, is the same as checking the whole sequence; and a
min_tokens request never stops by EOS / stop token / stop string before min_tokens.
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Union

from minipaged.sampling import SamplingParams
from minipaged.sequence import Sequence, SequenceStatus


def check_stop(
    seq: Sequence,
    params: SamplingParams,
    eos_token_ids: Union[Collection[int], None] = None,
    max_model_len: Union[int, None] = None,
    *,
    new_char_count: Union[int, None] = None,
) -> Union[SequenceStatus, None]:
    """Decide whether `seq` finished with its last token; if so set seq.status (and
    seq.stop_reason, and trim seq.output_text) and return the status, else None.

    eos_token_ids: the model's EOS ids (None: seq.eos_token_ids). max_model_len: the
    context size; a sequence longer than it is FINISHED_LENGTH (its last token was
    sampled from a full context and is never fed back). new_char_count: characters the
    last token added to seq.output_text; it bounds the stop-string search to the new
    text and lets an EOS / stop token's own text be removed. None searches all the text.

    Order, as vLLM: min_tokens gate, EOS (unless ignore_eos), stop_token_ids, stop
    strings, context full, max_tokens. Where several stop strings match, the one that
    starts first wins (vLLM takes the first in the list).
    """
    if eos_token_ids is None:
        eos_token_ids = seq.eos_token_ids
    status, reason = _decide(seq, params, eos_token_ids, max_model_len, new_char_count)
    if status is not None:
        seq.status = status
        seq.stop_reason = reason
    return status


def _decide(seq, params, eos_token_ids, max_model_len, new_char_count):
    context_full = max_model_len is not None and seq.get_len() > max_model_len
    if seq.get_output_len() < params.min_tokens:
        # Only a full context can end it early (vLLM would run past max_model_len).
        return (SequenceStatus.FINISHED_LENGTH, None) if context_full else (None, None)

    last = seq.last_token_id
    if not params.ignore_eos and last in eos_token_ids:
        _trim_last_token_text(seq, params, new_char_count)
        return SequenceStatus.FINISHED_STOPPED, None
    if last in params.stop_token_ids:
        _trim_last_token_text(seq, params, new_char_count)
        return SequenceStatus.FINISHED_STOPPED, last

    stop_str = _match_stop_string(seq, params, new_char_count)
    if stop_str is not None:
        return SequenceStatus.FINISHED_STOPPED, stop_str

    if context_full:
        return SequenceStatus.FINISHED_LENGTH, None
    if params.max_tokens is not None and seq.get_output_len() >= params.max_tokens:
        return SequenceStatus.FINISHED_LENGTH, None
    return None, None


def _trim_last_token_text(seq: Sequence, params: SamplingParams, new_char_count) -> None:
    # The text of an EOS / stop token (often empty with skip_special_tokens) is not
    # part of the answer unless asked for.
    if new_char_count and not params.include_stop_str_in_output:
        seq.output_text = seq.output_text[:-new_char_count]


def _match_stop_string(seq: Sequence, params: SamplingParams, new_char_count):
    if not params.stop or new_char_count == 0:
        return None
    text = seq.output_text
    best_index, best_str = None, None
    for stop_str in params.stop:
        # A match must end inside the new text: start searching len(stop_str) - 1
        # characters before it (earlier matches were found on earlier tokens).
        start = 0
        if new_char_count is not None:
            start = max(0, len(text) - new_char_count - len(stop_str) + 1)
        index = text.find(stop_str, start)
        if index != -1 and (best_index is None or index < best_index):
            best_index, best_str = index, stop_str
    if best_str is None:
        return None
    end = best_index + len(best_str) if params.include_stop_str_in_output else best_index
    seq.output_text = text[:end]
    return best_str
