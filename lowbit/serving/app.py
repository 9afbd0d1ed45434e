"""The FastAPI app: /v1/models, /v1/completions, /v1/chat/completions (with SSE streaming).

One request generates at a time (a FIFO lock around the model); others wait their turn. A
streaming client that disconnects stops its generation at the next token, freeing the model.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from typing import Iterator, Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lowbit.errors import LowbitError
from lowbit.serving.protocol import ChatCompletionRequest, CompletionRequest, error_body

DEFAULT_MAX_TOKENS = 256


class _ClosingStream(StreamingResponse):
    """Closes its generator however the response ends: a client that disconnects makes Starlette raise out
    of ``stream_response`` and leaves the generator suspended, holding the model's turn until it is
    garbage-collected (the next request and shutdown would wait for that)."""

    async def stream_response(self, send) -> None:
        try:
            await super().stream_response(send)
        finally:
            await self.body_iterator.aclose()


class _Cancelled(Exception):
    pass


def create_app(llm, model_name: str, api_key: Optional[str] = None) -> FastAPI:
    """An app serving ``llm`` under ``model_name``; with ``api_key`` every /v1 call needs ``Bearer api_key``."""
    app = FastAPI(title="lowbit", version="1")
    turn = asyncio.Lock()  # FIFO order among waiting requests
    engine = threading.Lock()  # the model and its KV cache: one generation at a time, even after a cancel

    @app.exception_handler(RequestValidationError)
    async def invalid(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ()) if p != "body") or None
        return JSONResponse(error_body(f"{first.get('msg', 'invalid request')}", param=where), status_code=400)

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

    def run_stream(prompt_ids, params, cancel: threading.Event) -> Iterator[tuple[str, Optional[str]]]:
        with engine:
            for delta, finish in llm.stream_ids(prompt_ids, params):
                if cancel.is_set():
                    raise _Cancelled
                yield delta, finish

    async def generate(prompt_ids, params) -> tuple[str, str]:
        llm.check_length(len(prompt_ids), params.max_tokens)
        async with turn:
            pieces = await asyncio.to_thread(lambda: list(run_stream(prompt_ids, params, threading.Event())))
        return "".join(d for d, _ in pieces), next((f for _, f in reversed(pieces) if f), "length")

    async def stream(prompt_ids, params, request: Request, chunk) -> StreamingResponse:
        llm.check_length(len(prompt_ids), params.max_tokens)
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()

        def produce() -> None:
            try:
                for item in run_stream(prompt_ids, params, cancel):
                    loop.call_soon_threadsafe(queue.put_nowait, item)
            except _Cancelled:
                pass
            except Exception as exc:  # reported to the client as an error event
                loop.call_soon_threadsafe(queue.put_nowait, exc)
            loop.call_soon_threadsafe(queue.put_nowait, None)

        async def events():
            async with turn:
                worker = loop.run_in_executor(None, produce)
                try:
                    yield f"data: {json.dumps(chunk(None, None, first=True))}\n\n"
                    while (item := await queue.get()) is not None:
                        if isinstance(item, Exception):
                            yield f"data: {json.dumps(error_body(str(item), 'server_error'))}\n\n"
                            break
                        delta, finish = item
                        yield f"data: {json.dumps(chunk(delta, finish))}\n\n"
                    yield "data: [DONE]\n\n"
                finally:
                    cancel.set()
                    await worker

        return _ClosingStream(events(), media_type="text/event-stream")

    def usage(prompt_tokens: int, text: str) -> dict:
        completion = len(llm.tokenizer(text, add_special_tokens=False).input_ids)
        return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}

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
        params = body.sampling(DEFAULT_MAX_TOKENS)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not prompts:
            raise LowbitError("prompt must not be empty")
        rid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            if len(prompts) != 1:
                raise LowbitError("streaming supports one prompt per request")

            def chunk(delta, finish, first=False):
                choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": finish}
                return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": [choice]}

            return await stream(llm.encode(prompts[0]), params, request, chunk)
        choices, prompt_tokens, texts = [], 0, ""
        for i, prompt in enumerate(prompts):
            ids = llm.encode(prompt)
            text, finish = await generate(ids, params)
            prompt_tokens += len(ids)
            texts += text
            choices.append({"index": i, "text": text, "logprobs": None, "finish_reason": finish})
        return {"id": rid, "object": "text_completion", "created": created, "model": model_name, "choices": choices,
                "usage": usage(prompt_tokens, texts)}

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        params = body.sampling(DEFAULT_MAX_TOKENS)
        ids = llm.encode_chat([m.model_dump() for m in body.messages])
        rid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:

            def chunk(delta, finish, first=False):
                d = {"role": "assistant", "content": ""} if first else ({"content": delta} if delta else {})
                choice = {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}
                return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model_name,
                        "choices": [choice]}

            return await stream(ids, params, request, chunk)
        text, finish = await generate(ids, params)
        message = {"role": "assistant", "content": text}
        return {"id": rid, "object": "chat.completion", "created": created, "model": model_name,
                "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish}],
                "usage": usage(len(ids), text)}

    return app
