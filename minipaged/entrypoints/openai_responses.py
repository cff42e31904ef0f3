"""The OpenAI HTTP API's responses as pydantic models, and the two formats OpenAI uses
for log-probabilities (per token text with offsets for /v1/completions, a list of token
objects for /v1/chat/completions).

The shapes are OpenAI's, so that any OpenAI client reads them: objects "list" (models),
"text_completion", "chat.completion" and "chat.completion.chunk" (streaming).

Invariant: a logprob is reported for exactly the tokens the engine generated, in order,
each with at most `n` alternatives, the most likely first.
"""

from __future__ import annotations

import time
from typing import Literal, Union

from pydantic import BaseModel, Field


class UsageInfo(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int = Field(default_factory=lambda: int(time.time()))
    owned_by: str = "minipaged"
    root: Union[str, None] = None
    max_model_len: Union[int, None] = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class CompletionLogProbs(BaseModel):
    text_offset: list[int] = Field(default_factory=list)
    token_logprobs: list[Union[float, None]] = Field(default_factory=list)
    tokens: list[str] = Field(default_factory=list)
    top_logprobs: list[Union[dict[str, float], None]] = Field(default_factory=list)


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: Union[CompletionLogProbs, None] = None
    finish_reason: Union[str, None] = None
    stop_reason: Union[int, str, None] = None


class CompletionResponse(BaseModel):
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[CompletionChoice]
    usage: Union[UsageInfo, None] = None


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob] = Field(default_factory=list)


class ChatLogProbs(BaseModel):
    content: list[ChatTokenLogprob] = Field(default_factory=list)


class ChatMessageOut(BaseModel):
    role: str = "assistant"
    content: str = ""


class ChatChoice(BaseModel):
    index: int
    message: ChatMessageOut
    logprobs: Union[ChatLogProbs, None] = None
    finish_reason: Union[str, None] = None
    stop_reason: Union[int, str, None] = None


class ChatCompletionResponse(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChoice]
    usage: Union[UsageInfo, None] = None


class DeltaMessage(BaseModel):
    role: Union[str, None] = None
    content: Union[str, None] = None


class ChatChunkChoice(BaseModel):
    index: int
    delta: DeltaMessage
    logprobs: Union[ChatLogProbs, None] = None
    finish_reason: Union[str, None] = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int = Field(default_factory=lambda: int(time.time()))
    model: str
    choices: list[ChatChunkChoice]
    usage: Union[UsageInfo, None] = None


# ---- logprobs in OpenAI's two formats ------------------------------------------------------

def token_text(tokenizer, token_id: int) -> str:
    if tokenizer is None:
        return f"token_id:{token_id}"
    return tokenizer.decode([token_id], skip_special_tokens=False)


def completion_logprobs(tokenizer, token_ids: list[int],
                        logprobs: list[dict[int, float] | None],
                        num_top: int, text_offset: int = 0) -> CompletionLogProbs:
    """/v1/completions format: parallel lists, top_logprobs as {token text: logprob}:
    the num_top most likely tokens and, as OpenAI's legacy API does, always the sampled
    one (so up to num_top + 1 entries; with logprobs=0, the sampled token alone). A step
    of None (an echoed prompt's first token: nothing precedes it) gives None in both."""
    out = CompletionLogProbs()
    for tid, step in zip(token_ids, logprobs):
        tok = token_text(tokenizer, tid)
        out.tokens.append(tok)
        out.text_offset.append(text_offset)
        text_offset += len(tok)
        if step is None:
            out.token_logprobs.append(None)
            out.top_logprobs.append(None)
            continue
        out.token_logprobs.append(step.get(tid))
        ranked = sorted(step.items(), key=lambda kv: kv[1], reverse=True)[:max(num_top, 0)]
        if tid in step and all(t != tid for t, _ in ranked):
            ranked.append((tid, step[tid]))
        out.top_logprobs.append({token_text(tokenizer, t): lp for t, lp in ranked})
    return out


def chat_logprobs(tokenizer, token_ids: list[int], logprobs: list[dict[int, float]],
                  num_top: int) -> ChatLogProbs:
    """/v1/chat/completions format: one entry per token with its top alternatives."""
    content = []
    for tid, step in zip(token_ids, logprobs):
        tok = token_text(tokenizer, tid)
        ranked = sorted(step.items(), key=lambda kv: kv[1], reverse=True)[:max(num_top, 0)]
        content.append(ChatTokenLogprob(
            token=tok, logprob=step.get(tid, -9999.0), bytes=list(tok.encode()),
            top_logprobs=[TopLogprob(token=(t := token_text(tokenizer, i)), logprob=lp,
                                     bytes=list(t.encode())) for i, lp in ranked]))
    return ChatLogProbs(content=content)
