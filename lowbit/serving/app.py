"""The FastAPI app: /health, /v1/models, /v1/completions, /v1/chat/completions (with SSE streaming).

Generations run in the engine (:mod:`lowbit.serving.engine`), off the event loop, and so does tokenization, so
/health and /v1/models answer while the model works. Bodies over ``max_body_bytes`` get a 413 before they are
read; prompts that do not fit the context get a 400 before any work. A client that disconnects, streaming or
not, cancels its generation at the next token.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import AsyncIterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowbit.errors import LowbitError
from lowbit.runtime.sequence import Step, TokenLogprob
from lowbit.serving.engine import engine_for
from lowbit.serving.protocol import ChatCompletionRequest, CompletionRequest, error_body, _Sampling

DEFAULT_MAX_TOKENS = 256
MAX_BODY_BYTES = 8 << 20  # 8 MiB: far above any prompt that fits a context this server can hold


class _ClosingStream(StreamingResponse):
    """Closes its generator however the response ends: a client that disconnects makes Starlette raise out
    of ``stream_response`` and leaves the generator suspended, holding the model's turn until it is
    garbage-collected (the next request and shutdown would wait for that)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


class BodyLimit:
    """ASGI middleware: a request body over ``max_bytes`` gets a 413 (by its Content-Length before anything is
    read, or as soon as a chunked body passes the limit); a body within it is handed on whole."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            return await self._too_large(scope, receive, send)
        body, more = b"", True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body += message.get("body", b"")
            more = message.get("more_body", False)
            if len(body) > self.max_bytes:
                return await self._too_large(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope, receive, send):
        limit = f"{self.max_bytes / (1 << 20):g} MiB"
        response = JSONResponse(error_body(f"request body larger than {limit}", code=413), status_code=413)
        await response(scope, receive, send)


def create_app(llm, model_name: str, api_key: Optional[str] = None, max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """An app serving ``llm`` under ``model_name``; with ``api_key`` every /v1 call needs ``Bearer api_key``."""
    app = FastAPI(title="lowbit", version="1")
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    engine = engine_for(llm)
    tokenizing = ThreadPoolExecutor(1, thread_name_prefix="lowbit-tokenize")  # one at a time, off the event loop

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        errors = exc.errors()  # a union's alternatives each fail: lowbit's own explanation first
        first = next((e for e in errors if e.get("type") == "value_error"), errors[0] if errors else {})
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _type_label(p)) or None
        message = str(first.get("msg", "invalid request")).removeprefix("Value error, ")
        if where and first.get("type") != "value_error":  # pydantic's own words do not name the field
            message = f"{where}: {message}"
        return JSONResponse(error_body(message, param=where), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), code=exc.status_code), status_code=exc.status_code)

    @app.exception_handler(LowbitError)
    async def user_error(_request, exc: LowbitError):
        return JSONResponse(error_body(str(exc)), status_code=400)

    @app.middleware("http")
    async def authenticate(request: Request, call_next):
        if api_key and request.url.path.startswith("/v1"):
            if request.headers.get("authorization", "") != f"Bearer {api_key}":
                return JSONResponse(
                    error_body("invalid or missing API key", "authentication_error", code="invalid_api_key"), 401
                )
        return await call_next(request)

    def check_model(name: Optional[str]) -> None:
        if name not in (None, model_name):
            raise StarletteHTTPException(404, f"model {name!r} does not exist; this server has {model_name!r}")

    async def tokenize(fn, *args) -> list[int]:
        return await asyncio.get_running_loop().run_in_executor(tokenizing, fn, *args)

    def sampling(body: _Sampling, prompt_tokens: int):
        """The request's sampling parameters; without a max_tokens, the default clamped to the context left."""
        asked = body.requested_max_tokens()
        left = llm.max_model_len - prompt_tokens
        if asked is None and left < 1:
            raise LowbitError(f"prompt ({prompt_tokens} tokens) fills the context of {llm.max_model_len} tokens")
        params = body.sampling(asked if asked is not None else min(DEFAULT_MAX_TOKENS, left))
        llm.check_length(prompt_tokens, params.max_tokens)
        return params

    async def until_disconnected(request: Request, steps: AsyncIterator[Step]) -> AsyncIterator[Step]:
        """The steps while the client is still there; closing ``steps`` (cancelling the generation) otherwise."""
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            while True:
                following = asyncio.ensure_future(steps.__anext__())
                await asyncio.wait({following, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not following.done():
                    following.cancel()  # the engine's generator closes on the cancellation, freeing its turn
                    with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                        await following
                    return
                try:
                    yield following.result()
                except StopAsyncIteration:
                    return
        finally:
            gone.cancel()
            await steps.aclose()

    def usage(prompt_tokens: int, completion_tokens: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens}

    def stream(prompt_ids, params, top_logprobs, chunk, include_usage: bool) -> StreamingResponse:
        """SSE chunks: chunk(None, first=True), then chunk(step) per step with text or logprobs, the usage chunk
        when asked, [DONE]."""

        async def events():
            steps = engine.generate(prompt_ids, params, top_logprobs)
            generated = 0
            try:
                yield f"data: {json.dumps(chunk(None, first=True))}\n\n"
                async for step in steps:
                    generated = step.generated
                    if step.delta or step.finish or step.logprobs:
                        yield f"data: {json.dumps(chunk(step))}\n\n"
                if include_usage:
                    final = {**chunk(None), "choices": [], "usage": usage(len(prompt_ids), generated)}
                    yield f"data: {json.dumps(final)}\n\n"
            except LowbitError as exc:
                yield f"data: {json.dumps(error_body(str(exc)))}\n\n"
            except Exception as exc:  # the stream has started: the error goes in it
                yield f"data: {json.dumps(error_body(str(exc), 'server_error'))}\n\n"
            finally:
                await steps.aclose()
            yield "data: [DONE]\n\n"

        return _ClosingStream(events(), media_type="text/event-stream")

    async def collect(prompt_ids, params, top_logprobs, request: Request) -> tuple[str, str, list[TokenLogprob], int]:
        """(text, finish reason, logprobs, tokens generated) of a whole generation."""
        pieces, logprobs, finish, generated = [], [], "length", 0
        async for step in until_disconnected(request, engine.generate(prompt_ids, params, top_logprobs)):
            pieces.append(step.delta)
            logprobs += step.logprobs
            finish, generated = step.finish or finish, step.generated
        return "".join(pieces), finish, logprobs, generated

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        created = int(time.time())
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "lowbit"}]}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise LowbitError("prompt must not be empty")
        encoded = [await tokenize(llm.encode, p) for p in prompts]
        params = [sampling(body, len(ids)) for ids in encoded]  # every prompt checked before any generates
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "object": "text_completion", "created": created, "model": model_name}
        if body.stream:
            if len(prompts) != 1:
                raise LowbitError("streaming supports one prompt per request")

            def chunk(step: Optional[Step], first: bool = False):
                text = step.delta if step else ""
                lp = completion_logprobs(step.logprobs) if step and body.logprobs is not None else None
                return {**head, "choices": [{"index": 0, "text": text, "logprobs": lp,
                                             "finish_reason": step.finish if step else None}]}

            return stream(encoded[0], params[0], body.logprobs, chunk, body.include_usage)
        choices, prompt_tokens, completion_tokens = [], 0, 0
        for i, (ids, p) in enumerate(zip(encoded, params)):
            text, finish, logprobs, generated = await collect(ids, p, body.logprobs, request)
            prompt_tokens, completion_tokens = prompt_tokens + len(ids), completion_tokens + generated
            lp = completion_logprobs(logprobs) if body.logprobs is not None else None
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": finish})
        return {**head, "choices": choices, "usage": usage(prompt_tokens, completion_tokens)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        ids = await tokenize(llm.encode_chat, [m.as_template_message() for m in body.messages])
        params = sampling(body, len(ids))
        top = (body.top_logprobs or 0) if body.logprobs else None
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        head = {"id": rid, "created": created, "model": model_name}
        if body.stream:

            def chunk(step: Optional[Step], first: bool = False):
                delta = {"role": "assistant", "content": ""} if first else ({"content": step.delta} if step and step.delta else {})
                lp = {"content": chat_logprobs(step.logprobs)} if step and top is not None else None
                choice = {"index": 0, "delta": delta, "logprobs": lp, "finish_reason": step.finish if step else None}
                return {**head, "object": "chat.completion.chunk", "choices": [choice]}

            return stream(ids, params, top, chunk, body.include_usage)
        text, finish, logprobs, generated = await collect(ids, params, top, request)
        lp = {"content": chat_logprobs(logprobs)} if top is not None else None
        message = {"role": "assistant", "content": text}
        return {**head, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "logprobs": lp, "finish_reason": finish}],
                "usage": usage(len(ids), generated)}

    return app


def _type_label(part) -> bool:
    """Whether a validation error's location part names a union alternative (``str``, ``list[...]``), not a field."""
    return isinstance(part, str) and (part in ("str", "int", "float", "bool") or "[" in part)


async def _disconnected(request: Request) -> None:
    """Returns once the client has gone."""
    while not await request.is_disconnected():
        await asyncio.sleep(0.2)


def chat_logprobs(entries: list[TokenLogprob]) -> list[dict]:
    """Chat completions' ``logprobs.content``: token, logprob, UTF-8 bytes and ``top_logprobs`` per token."""
    def one(token: str, logprob: float) -> dict:
        return {"token": token, "logprob": logprob, "bytes": list(token.encode())}

    return [{**one(e.token, e.logprob), "top_logprobs": [one(t, lp) for t, lp in e.top]} for e in entries]


def completion_logprobs(entries: list[TokenLogprob]) -> dict:
    """Completions' legacy ``logprobs``: parallel lists, the alternatives as {token: logprob}."""
    offsets, at = [], 0
    for e in entries:
        offsets.append(at)
        at += len(e.token)
    return {"tokens": [e.token for e in entries], "token_logprobs": [e.logprob for e in entries],
            "top_logprobs": [dict(e.top) for e in entries], "text_offset": offsets}
