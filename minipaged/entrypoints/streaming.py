"""Streaming the engine's outputs to HTTP clients: merging the streams of a request's
prompts, server-sent events in OpenAI's chunk formats, and the final outputs of a
non-streaming request.

Section 5 of the paper: the frontend hands each request to the engine and receives its
tokens as the engine generates them, step by step (iteration-level scheduling); here
each step's new text becomes one server-sent event as soon as it is decoded.

Invariant: leaving a stream early, for whatever reason (the client went away, an
error, a cancelled task), closes every engine stream it merged, which aborts the
unfinished requests: their KV blocks return to the pool at the next step.
"""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse

from minipaged.entrypoints.async_engine import EngineStepError
from minipaged.entrypoints.request_stream import DeltaTracker, RequestStream
from minipaged.entrypoints.openai_protocol import (ChatCompletionRequest, CompletionRequest,
                                                  error_body)
from minipaged.entrypoints.openai_responses import (
    ChatChunkChoice, ChatCompletionChunk, CompletionChoice, CompletionResponse, DeltaMessage,
    UsageInfo, chat_logprobs, completion_logprobs)
from minipaged.outputs import RequestOutput
from minipaged.sampling import SamplingParams


async def merge(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """(prompt index, output) of several request streams, as the outputs arrive.

    Leaving early (or being cancelled) closes every stream, which aborts the unfinished.
    """
    if len(streams) == 1:
        async with aclosing(streams[0].__aiter__()) as it:
            async for out in it:
                yield 0, out
        return
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(i: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((i, out))
        except Exception as e:  # noqa: BLE001 - handed to the consumer
            queue.put_nowait((i, e))
        queue.put_nowait((i, None))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            i, item = await queue.get()
            if item is None:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()   # a pump cancelled mid-stream closes (aborts) its stream


async def collect(streams: list[RequestStream], raw: Request) -> list[RequestOutput] | None:
    """The final output of each stream; None if the client disconnected (all aborted)."""
    finals: list[RequestOutput | None] = [None] * len(streams)
    async with aclosing(merge(streams)) as outputs:
        async for i, out in outputs:
            finals[i] = out
            if await raw.is_disconnected():
                return None
    if any(f is None or not f.finished for f in finals):
        raise EngineStepError("the request was aborted before it finished")
    return finals  # type: ignore[return-value]


def usage(finals: list[RequestOutput]) -> UsageInfo:
    prompt = sum(len(o.prompt_token_ids) for o in finals)
    completion = sum(len(c.token_ids) for o in finals for c in o.outputs)
    return UsageInfo(prompt_tokens=prompt, completion_tokens=completion,
                     total_tokens=prompt + completion)


def sse_data(payload: str) -> str:
    return f"data: {payload}\n\n"


def sse(chunks: AsyncIterator[str]) -> StreamingResponse:
    async def framed() -> AsyncIterator[str]:
        try:
            async with aclosing(chunks) as it:
                async for c in it:
                    yield c
        except EngineStepError as e:
            yield sse_data(json.dumps(error_body(str(e), None, "internal_server_error")))
        yield "data: [DONE]\n\n"

    return StreamingResponse(framed(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})


async def completion_chunks(streams: list[RequestStream], body: CompletionRequest,
                            params: SamplingParams, request_id: str, model: str,
                            echo: list[str], tokenizer) -> AsyncIterator[str]:
    """The SSE chunks of /v1/completions: one per new piece of text of any choice of any
    prompt (choice index = prompt * n + sample), then the usage if asked for."""
    created = int(time.time())
    deltas = DeltaTracker(params)
    finals: dict[int, RequestOutput] = {}
    async with aclosing(merge(streams)) as outputs:
        async for p, out in outputs:
            finals[p] = out
            for c in out.outputs:
                index = p * params.n + c.index
                text, tokens, first = deltas.advance(index, c)
                if text is None:
                    continue
                lp = None
                if params.logprobs is not None and c.logprobs is not None:
                    start = len(c.token_ids) - len(tokens)
                    # offsets count from the start of the choice's text (the echoed prompt
                    # included), not the chunk's
                    ids, steps = tokens, c.logprobs[start:]
                    offset = len(echo[p]) + deltas.sent_chars[index] - len(text)
                    if first and echo[p]:   # the prompt's tokens and logprobs lead its first
                        ids = list(out.prompt_token_ids) + ids
                        steps = list(out.prompt_logprobs or []) + steps
                        offset = 0
                    lp = completion_logprobs(tokenizer, ids, steps, params.logprobs,
                                             text_offset=offset)
                chunk = CompletionResponse(
                    id=request_id, created=created, model=model,
                    choices=[CompletionChoice(
                        index=index, text=(echo[p] if first else "") + text, logprobs=lp,
                        finish_reason=c.finish_reason, stop_reason=c.stop_reason)])
                yield sse_data(chunk.model_dump_json())
    if body.include_usage:
        chunk = CompletionResponse(id=request_id, created=created, model=model,
                                   choices=[], usage=usage([finals[p] for p in
                                                            sorted(finals)]))
        yield sse_data(chunk.model_dump_json())

async def chat_chunks(stream: RequestStream, body: ChatCompletionRequest,
                      params: SamplingParams, request_id: str, model: str, tokenizer
                      ) -> AsyncIterator[str]:
    """The SSE chunks of /v1/chat/completions: each choice's role first, then a delta per
    new piece of text, then the usage if asked for."""
    created = int(time.time())

    def chunk(choices: list[ChatChunkChoice], usage_info=None) -> str:
        data = ChatCompletionChunk(id=request_id, created=created, model=model,
                                   choices=choices, usage=usage_info).model_dump()
        for choice in data["choices"]:   # OpenAI sends only the delta's present keys
            choice["delta"] = {k: v for k, v in choice["delta"].items() if v is not None}
        if data["usage"] is None:
            del data["usage"]
        return sse_data(json.dumps(data, ensure_ascii=False))

    for i in range(params.n):
        yield chunk([ChatChunkChoice(index=i, delta=DeltaMessage(role="assistant",
                                                                 content=""))])
    deltas = DeltaTracker(params)
    final = None
    async with aclosing(merge([stream])) as outputs:
        async for _, out in outputs:
            final = out
            for c in out.outputs:
                text, tokens, _ = deltas.advance(c.index, c)
                if text is None:
                    continue
                lp = None
                if body.logprobs and c.logprobs is not None:
                    start = len(c.token_ids) - len(tokens)
                    lp = chat_logprobs(tokenizer, tokens, c.logprobs[start:],
                                   body.top_logprobs or 0)
                yield chunk([ChatChunkChoice(
                    index=c.index, delta=DeltaMessage(content=text or None), logprobs=lp,
                    finish_reason=c.finish_reason)])
    if body.include_usage and final is not None:
        yield chunk([], usage([final]))
