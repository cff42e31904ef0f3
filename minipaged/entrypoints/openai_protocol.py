"""The OpenAI HTTP API's requests as pydantic models, and their mapping to SamplingParams
(the responses are in openai_responses.py).

Requests accept OpenAI's fields and vLLM's extra sampling fields (top_k, min_p,
repetition_penalty, use_beam_search, length_penalty, early_stopping, ignore_eos,
min_tokens, stop_token_ids, skip_special_tokens, include_stop_str_in_output), so a
client written for vLLM's server works unchanged. Unknown fields are ignored (as OpenAI
and vLLM do).

Invariant: a request that converts to SamplingParams is valid for the engine; every
invalid value raises `RequestError` whose `param` names the request field at fault, which
the server turns into HTTP 400 with an OpenAI-style error body.
"""

from __future__ import annotations

import uuid
from typing import Any, Union

from pydantic import BaseModel, ConfigDict

from minipaged.sampling import SamplingParams

#: the most top logprobs a request may ask for per token (vLLM's default max_logprobs)
MAX_LOGPROBS = 20


class RequestError(ValueError):
    """Invalid input: becomes a 400 response naming `param`."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def error_body(message: str, param: str | None = None,
               type_: str = "invalid_request_error") -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": None}}


def random_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


class OpenAIModel(BaseModel):
    # extra fields are accepted and ignored, as OpenAI and vLLM do
    model_config = ConfigDict(extra="ignore")


class StreamOptions(OpenAIModel):
    include_usage: bool = False


class SamplingFields(OpenAIModel):
    """Fields shared by both endpoints; vLLM's extras after the OpenAI ones."""

    model: str
    n: int = 1
    best_of: Union[int, None] = None
    temperature: Union[float, None] = None
    top_p: Union[float, None] = None
    seed: Union[int, None] = None
    stop: Union[str, list[str], None] = None
    stream: bool = False
    stream_options: Union[StreamOptions, None] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: Union[dict[str, float], None] = None
    user: Union[str, None] = None
    # vLLM's extra sampling parameters
    top_k: int = -1
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: Union[bool, str] = False
    ignore_eos: bool = False
    min_tokens: int = 0
    stop_token_ids: Union[list[int], None] = None
    skip_special_tokens: bool = True
    include_stop_str_in_output: bool = False

    def _sampling_params(self, max_tokens: int | None, logprobs: int | None,
                         prompt_logprobs: int | None = None) -> SamplingParams:
        if self.logit_bias:
            raise RequestError("logit_bias is not supported by this server", "logit_bias")
        if logprobs is not None and logprobs > MAX_LOGPROBS:
            raise RequestError(f"logprobs must be at most {MAX_LOGPROBS}, got {logprobs}",
                               "logprobs")
        if self.stream and self.use_beam_search:
            raise RequestError("stream is not supported with use_beam_search (beams are "
                               "only known at the end)", "stream")
        if self.stream and self.best_of is not None and self.best_of != self.n:
            raise RequestError("best_of must equal n when streaming (only the best n of "
                               "best_of are known at the end)", "best_of")
        temperature = 1.0 if self.temperature is None else self.temperature
        if self.use_beam_search and self.temperature is None:
            temperature = 0.0
        try:
            return SamplingParams(
                n=self.n, best_of=self.best_of, temperature=temperature,
                top_p=1.0 if self.top_p is None else self.top_p, top_k=self.top_k,
                min_p=self.min_p, seed=self.seed, max_tokens=max_tokens,
                min_tokens=self.min_tokens, stop=self.stop, stop_token_ids=self.stop_token_ids,
                ignore_eos=self.ignore_eos, logprobs=logprobs,
                presence_penalty=self.presence_penalty,
                frequency_penalty=self.frequency_penalty,
                repetition_penalty=self.repetition_penalty,
                use_beam_search=self.use_beam_search, length_penalty=self.length_penalty,
                early_stopping=self.early_stopping,
                skip_special_tokens=self.skip_special_tokens,
                include_stop_str_in_output=self.include_stop_str_in_output,
                prompt_logprobs=prompt_logprobs)
        except ValueError as e:
            # SamplingParams' messages start with the field's name ("top_p must be ...")
            param = str(e).split(" ", 1)[0].rstrip(":")
            if param == "best_of" and self.best_of is None:
                param = "n"        # best_of defaulted to n: the client's field is n
            raise RequestError(str(e), param) from None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Union[int, None] = 16
    logprobs: Union[int, None] = None
    echo: bool = False
    suffix: Union[str, None] = None

    def prompts(self) -> list[str | list[int]]:
        """The prompts of the batch, each a string or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            prompts: list = [p]
        elif p and all(isinstance(x, int) for x in p):
            prompts = [list(p)]
        else:
            prompts = list(p)
        if not prompts or any(len(x) == 0 for x in prompts):
            raise RequestError("prompt must not be empty", "prompt")
        return prompts

    def to_sampling_params(self) -> SamplingParams:
        if self.suffix:
            raise RequestError("suffix is not supported by this server", "suffix")
        # echo with logprobs scores the prompt itself (its prompt logprobs); with
        # max_tokens 0 nothing is generated for the client (one token is, and dropped)
        return self._sampling_params(1 if self.echo_only else self.max_tokens, self.logprobs,
                                     self.logprobs if self.echo else None)

    @property
    def echo_only(self) -> bool:
        """echo with max_tokens 0 (not streamed): answer with the prompt alone."""
        return self.echo and self.max_tokens == 0 and not self.stream


class ChatMessage(OpenAIModel):
    role: str
    content: Union[str, list[dict[str, Any]], None] = None

    def text(self) -> str:
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise RequestError("messages: only text content parts are supported",
                                   "messages")
            parts.append(part["text"])
        return "".join(parts)


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage]
    max_tokens: Union[int, None] = None
    max_completion_tokens: Union[int, None] = None
    logprobs: bool = False
    top_logprobs: Union[int, None] = None
    tools: Union[list[dict[str, Any]], None] = None
    response_format: Union[dict[str, Any], None] = None
    # vLLM's extras for templating
    add_generation_prompt: bool = True
    echo: bool = False

    def conversation(self) -> list[dict[str, str]]:
        if not self.messages:
            raise RequestError("messages must not be empty", "messages")
        return [{"role": m.role, "content": m.text()} for m in self.messages]

    def to_sampling_params(self) -> SamplingParams:
        if self.tools:
            raise RequestError("tools are not supported by this server", "tools")
        if self.response_format and self.response_format.get("type", "text") != "text":
            raise RequestError("response_format: only {'type': 'text'} is supported",
                               "response_format")
        if self.top_logprobs is not None and not self.logprobs:
            raise RequestError("top_logprobs needs logprobs to be true", "top_logprobs")
        if self.top_logprobs is not None and self.top_logprobs < 0:
            raise RequestError(f"top_logprobs must be >= 0, got {self.top_logprobs}",
                               "top_logprobs")
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        try:
            return self._sampling_params(max_tokens, logprobs)
        except RequestError as e:
            if e.param == "logprobs":
                e.param = "top_logprobs"
            raise
