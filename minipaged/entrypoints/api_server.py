"""An OpenAI-compatible HTTP server over the paged engine (the paper's serving frontend,
section 5: "a FastAPI frontend ... extends the OpenAI API interface").

    minipaged serve --model smollm2-135m --port 8000
    curl localhost:8000/v1/completions -d '{"model": "smollm2-135m", "prompt": "Hi"}'

Endpoints: GET /v1/models, POST /v1/completions, POST /v1/chat/completions (the model's
chat template applied), `"stream": true` as server-sent events ending in `data: [DONE]`,
GET /health, GET /version and GET /metrics (Prometheus text format, see metrics.py).
Every request becomes one engine request per prompt; the AsyncLLMEngine adds it between
two steps and streams its outputs back (continuous batching: it joins the running batch
at the next iteration); streaming.py turns those outputs into OpenAI's chunks.

Invariant: invalid input is answered 400 with an OpenAI-style error body whose `param`
names the field (unknown model, bad sampling values, a prompt too long, malformed JSON)
and leaves nothing behind in the engine; a client that goes away mid-request (streaming
or not) aborts its request, so its KV blocks return to the pool at the next step.
"""

from __future__ import annotations

import logging
import time
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException

import minipaged
from minipaged.entrypoints.async_engine import AsyncLLMEngine, EngineStepError
from minipaged.entrypoints.request_stream import RequestStream
from minipaged.entrypoints.metrics import ServerMetrics
from minipaged.entrypoints.openai_protocol import (ChatCompletionRequest, CompletionRequest,
                                                  RequestError, error_body, random_id)
from minipaged.entrypoints.openai_responses import (
    ChatChoice, ChatCompletionResponse, ChatMessageOut, CompletionChoice, CompletionResponse,
    ModelCard, ModelList, chat_logprobs, completion_logprobs)
from minipaged.entrypoints.streaming import (chat_chunks, collect, completion_chunks, sse,
                                            usage)
from minipaged.sampling import SamplingParams

logger = logging.getLogger(__name__)


def build_app(engine: AsyncLLMEngine, served_model_names: list[str],
              model_root: str | None = None) -> FastAPI:
    """The FastAPI app serving `engine` under the given model names (the first is shown)."""
    metrics = ServerMetrics(engine.stats)
    engine.output_listeners.append(metrics.observe)
    engine.abort_listeners.append(metrics.aborted)
    vocab_size = getattr(getattr(getattr(engine.engine, "executor", None), "model_config",
                                 None), "vocab_size", None)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await engine.shutdown()

    app = FastAPI(title="minipaged", version=minipaged.__version__, lifespan=lifespan)
    app.state.engine, app.state.metrics = engine, metrics
    app.add_middleware(JSONBodyMiddleware)

    # ---- errors: OpenAI's shape, 400 for anything the client got wrong ---------------
    def bad_request(message: str, param: str | None) -> JSONResponse:
        metrics.bad_requests.inc()
        return JSONResponse(error_body(message, param), status_code=400)

    @app.exception_handler(RequestError)
    async def on_request_error(_: Request, exc: RequestError) -> JSONResponse:
        return bad_request(exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        err = exc.errors()[0] if exc.errors() else {}
        loc = [str(x) for x in err.get("loc", ()) if x != "body"]
        if err.get("type") == "json_invalid":
            return bad_request(f"malformed JSON body: {err.get('ctx', {}).get('error', '')}"
                               .rstrip(": "), None)
        param = loc[0] if loc else None
        where = ".".join(loc) if loc else "body"
        return bad_request(f"{where}: {err.get('msg', 'invalid value')}", param)

    @app.exception_handler(StarletteHTTPException)
    async def on_http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return JSONResponse(error_body(str(exc.detail), None, kind), status_code=exc.status_code)

    @app.exception_handler(EngineStepError)
    async def on_engine_error(_: Request, exc: EngineStepError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), None, "internal_server_error"), status_code=500)

    def check_model(name: str) -> str:
        if name not in served_model_names:
            raise RequestError(f"The model `{name}` does not exist; this server serves "
                               f"{', '.join(map(repr, served_model_names))}.", "model")
        return name

    def check_context(ids: list[int] | None, params: SamplingParams, prompt_param: str
                      ) -> None:
        """As OpenAI's and vLLM's servers: a prompt plus max_tokens that cannot fit the
        context is refused up front (LLM.generate, offline, stops at the context instead)."""
        if ids is None or params.max_tokens is None or len(ids) >= engine.max_model_len:
            return                   # no max_tokens: up to the context; too long: the engine says
        if len(ids) + params.max_tokens > engine.max_model_len:
            raise RequestError(
                f"This model's maximum context length is {engine.max_model_len} tokens; "
                f"the request asks for {len(ids) + params.max_tokens} ({len(ids)} in the "
                f"{prompt_param}, {params.max_tokens} to generate). Lower max_tokens or "
                f"shorten the {prompt_param}.", "max_tokens")

    async def add_all(request_id: str, prompts: list, params: SamplingParams,
                      prompt_param: str, token_ids: list[list[int]] | None = None,
                      arrival: float | None = None) -> list[RequestStream]:
        """One engine request per prompt; on any rejection, none is left running."""
        streams: list[RequestStream] = []
        try:
            for i, prompt in enumerate(prompts):
                ids = token_ids[i] if token_ids is not None else (
                    prompt if isinstance(prompt, list) else None)
                if ids is not None and vocab_size and any(
                        not 0 <= t < vocab_size for t in ids if isinstance(t, int)):
                    raise RequestError(f"{prompt_param}: token ids must be in "
                                       f"[0, {vocab_size})", prompt_param)
                text = prompt if isinstance(prompt, str) else None
                if ids is None and text is not None and engine.tokenizer is not None:
                    ids = engine.tokenizer.encode(text)   # as the engine would, once
                check_context(ids, params, prompt_param)
                streams.append(await engine.add_request(
                    text, params, f"{request_id}-{i}", prompt_token_ids=ids,
                    arrival_time=arrival))
        except BaseException as e:
            for s in streams:
                engine.abort(s.request_id)
            if isinstance(e, ValueError) and not isinstance(e, RequestError):
                # the engine names "prompt" / "prompt_token_ids"; the client knows its field
                raise RequestError(str(e), prompt_param) from None
            raise
        return streams

    # ---- routes -------------------------------------------------------------------------
    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version")
    async def version() -> dict:
        return {"version": minipaged.__version__}

    @app.get("/metrics")
    async def prometheus_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> ModelList:
        return ModelList(data=[ModelCard(id=name, root=model_root,
                                         max_model_len=engine.max_model_len)
                               for name in served_model_names])

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, raw: Request):
        arrival = time.monotonic()
        model = check_model(body.model)
        params = body.to_sampling_params()
        prompts = body.prompts()
        request_id = random_id("cmpl")
        streams = await add_all(request_id, prompts, params, "prompt", arrival=arrival)
        echo = [prompt_text(p, engine.tokenizer) if body.echo else "" for p in prompts]
        if body.stream:
            return sse(completion_chunks(streams, body, params, request_id, model, echo,
                                             engine.tokenizer))
        finals = await collect(streams, raw)
        if finals is None:
            return Response(status_code=499)      # the client is gone: nobody to answer
        choices = []
        for p, out in enumerate(finals):
            for i, c in enumerate(out.outputs):
                # echoed: the prompt's tokens and logprobs come first (OpenAI's legacy API)
                ids = list(out.prompt_token_ids) if body.echo else []
                steps = list(out.prompt_logprobs or []) if body.echo else []
                if not body.echo_only:
                    ids += c.token_ids
                    steps += c.logprobs or []
                lp = None
                if params.logprobs is not None:
                    lp = completion_logprobs(engine.tokenizer, ids, steps, params.logprobs)
                choices.append(CompletionChoice(
                    index=p * params.n + i, logprobs=lp, finish_reason=c.finish_reason,
                    text=echo[p] + ("" if body.echo_only else c.text),
                    stop_reason=c.stop_reason))
        counted = usage(finals)
        if body.echo_only:     # the one token generated to run the prompt is not returned
            counted.completion_tokens, counted.total_tokens = 0, counted.prompt_tokens
        return CompletionResponse(id=request_id, model=model, choices=choices, usage=counted)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, raw: Request):
        arrival = time.monotonic()
        model = check_model(body.model)
        params = body.to_sampling_params()
        text, ids = apply_chat_template(engine.tokenizer, body)
        request_id = random_id("chatcmpl")
        streams = await add_all(request_id, [text], params, "messages", token_ids=[ids],
                                arrival=arrival)
        if body.stream:
            return sse(chat_chunks(streams[0], body, params, request_id, model,
                                       engine.tokenizer))
        finals = await collect(streams, raw)
        if finals is None:
            return Response(status_code=499)
        out = finals[0]
        choices = []
        for i, c in enumerate(out.outputs):
            lp = None
            if body.logprobs and c.logprobs is not None:
                lp = chat_logprobs(engine.tokenizer, c.token_ids, c.logprobs,
                                   body.top_logprobs or 0)
            choices.append(ChatChoice(index=i, message=ChatMessageOut(content=c.text),
                                      logprobs=lp, finish_reason=c.finish_reason,
                                      stop_reason=c.stop_reason))
        return ChatCompletionResponse(id=request_id, model=model, choices=choices,
                                      usage=usage(finals))

    return app


class JSONBodyMiddleware:
    """Read every POST body under /v1/ as JSON whatever its Content-Type says (as
    OpenAI does): `curl -d '{...}'` sends form encoding unless told otherwise."""

    def __init__(self, app) -> None:
        self.app = app

    async def __call__(self, scope, receive, send) -> None:
        if (scope["type"] == "http" and scope["method"] == "POST"
                and scope["path"].startswith("/v1/")):
            headers = [(k, v) for k, v in scope["headers"] if k.lower() != b"content-type"]
            scope = {**scope, "headers": headers + [(b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


def prompt_text(prompt: str | list[int], tokenizer) -> str:
    if isinstance(prompt, str):
        return prompt
    return tokenizer.decode(prompt) if tokenizer is not None else ""


def apply_chat_template(tokenizer, body: ChatCompletionRequest) -> tuple[str, list[int]]:
    """The conversation as the model's chat template renders it, and its token ids."""
    conversation = body.conversation()
    if tokenizer is None or not getattr(tokenizer, "chat_template", None):
        raise RequestError("messages: this model has no chat template; use /v1/completions",
                           "messages")
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False,
                                             add_generation_prompt=body.add_generation_prompt)
    except Exception as e:  # noqa: BLE001 - a template's own checks (e.g. role order)
        raise RequestError(f"messages: the chat template rejected them: {e}",
                           "messages") from None
    # the template already holds the special tokens (BOS etc.): do not add them twice
    return text, tokenizer.encode(text, add_special_tokens=False)


def run_server(engine: AsyncLLMEngine, served_model_names: list[str], host: str = "127.0.0.1",
               port: int = 8000, model_root: str | None = None, log_level: str = "info") -> int:
    """Serve a loaded engine until interrupted (what `minipaged serve` runs)."""
    import sys

    import uvicorn

    app = build_app(engine, served_model_names, model_root=model_root)
    stats = engine.stats()
    print(f"minipaged: serving {served_model_names[0]!r} on http://{host}:{port}/v1 "
          f"({stats['num_gpu_blocks']} KV blocks of {stats['block_size']} tokens)",
          file=sys.stderr, flush=True)
    uvicorn.run(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=5)
    return 0
