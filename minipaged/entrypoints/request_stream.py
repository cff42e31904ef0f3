"""What one request's client receives from the serving loop: its outputs as an async
iterator (`RequestStream`), and, for streaming clients, only the new part of each
choice's text (`DeltaTracker`).

The paper's engine (Fig. 4) produces one token per running sequence per step; a client
of the OpenAI API wants a stream of text pieces it can print as they come. Between the
two sit a queue per request and a record of what each choice has already sent.

Invariant: text once sent is never taken back. A running choice holds back its last
(longest stop string - 1) characters, which could still be the start of a stop string
and be trimmed from the final text; and a stream that its consumer leaves early aborts
its request, so no request outlives the client that wanted it.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator, Callable

from minipaged.outputs import CompletionOutput, RequestOutput
from minipaged.sampling import SamplingParams


class RequestStream:
    """The outputs of one request, as an async iterator that ends after the final one.

    Leaving the `async for` early (a client that disconnected, a cancelled task) aborts
    the request, so its blocks go back to the pool at the next step boundary.
    """

    def __init__(self, request_id: str, abort: Callable[[str], None]) -> None:
        self.request_id = request_id
        self.finished = False
        self._abort = abort
        self._queue: asyncio.Queue[RequestOutput | BaseException | None] = asyncio.Queue()

    # producer side (the loop task) --------------------------------------------------
    def put(self, item: RequestOutput | BaseException | None) -> None:
        """An output, an exception to raise in the consumer, or None (ended: aborted)."""
        self._queue.put_nowait(item)

    # consumer side --------------------------------------------------------------------
    async def __aiter__(self) -> AsyncIterator[RequestOutput]:
        try:
            while True:
                item = await self._queue.get()
                if item is None:
                    self.finished = True
                    return
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                if item.finished:
                    self.finished = True
                yield item
                if self.finished:
                    return
        finally:
            if not self.finished:
                self.finished = True
                self._abort(self.request_id)


class DeltaTracker:
    """What each streamed choice has sent so far: only new text goes out in a chunk.

    While a choice runs, the last (longest stop string - 1) characters are held back:
    they could still turn out to be the start of a stop string, which is trimmed from
    the final text, and text once sent cannot be taken back.
    """

    def __init__(self, params: SamplingParams) -> None:
        stops = params.stop if not params.include_stop_str_in_output else []
        self.holdback = max((len(s) for s in stops), default=1) - 1
        self.sent_chars: dict[int, int] = {}
        self.sent_tokens: dict[int, int] = {}
        self.done: set[int] = set()

    def advance(self, index: int, c: CompletionOutput) -> tuple[str | None, list[int], bool]:
        """(new text or None if nothing to send, new token ids, is this the first chunk)."""
        if index in self.done:
            return None, [], False
        first = index not in self.sent_chars
        chars, toks = self.sent_chars.get(index, 0), self.sent_tokens.get(index, 0)
        end = len(c.text) if c.finish_reason else max(chars, len(c.text) - self.holdback)
        text, tokens = c.text[chars:end], list(c.token_ids[toks:])
        if not text and not tokens and not c.finish_reason:
            return None, [], False
        self.sent_chars[index], self.sent_tokens[index] = max(chars, end), len(c.token_ids)
        if c.finish_reason:
            self.done.add(index)
        return text, tokens, first
