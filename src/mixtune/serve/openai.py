"""`mixtune serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the batched engine.

POST /v1/chat/completions (text and image_url parts; streaming SSE or one JSON reply), GET /v1/models,
GET /health. Images come as `data:` URIs, or as local files under `allowed_local_media_path` (as vLLM
does); no other URL is fetched. A bad request gets a 4xx with OpenAI's error body and the server carries on.
Prompts are rendered by `prompting.py`, exactly as training and `mixtune predict` render them.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import io
import json
import logging
import os
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from mixtune.data.conversation import IMAGE_PLACEHOLDER
from mixtune.errors import DataError
from mixtune.infer.engine import Engine, GenerationOptions
from mixtune.prompting import conversation_from_turns
from mixtune.serve.batcher import Batcher, Pending, usage_of

log = logging.getLogger("mixtune")

ROLE_NAMES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


@dataclass
class ServeSettings:
    api_key: str | None = None
    allowed_local_media_path: str | None = None
    served_model_name: str = "model"
    max_body_bytes: int = 32 * 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024
    max_image_pixels: int = 4096 * 4096
    max_images: int = 8
    max_model_len: int | None = None  # default: the model's own position limit
    default_max_tokens: int = 256
    batch_window_s: float = 0.01
    max_batch_size: int = 16


class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param, code)


# ---- request -> conversation + images


def decode_image(url: str, settings: ServeSettings, param: str):
    from PIL import Image, UnidentifiedImageError

    if url.startswith("data:"):
        header, sep, payload = url.partition(",")
        if not sep or ";base64" not in header:
            raise bad("an image data URI must look like data:image/png;base64,<data>", param)
        if len(payload) * 3 // 4 > settings.max_image_bytes:
            raise ApiError(413, f"image over the {settings.max_image_bytes} byte limit", param)
        try:
            data = base64.b64decode(payload, validate=True)
        except (binascii.Error, ValueError):
            raise bad("the image data URI is not valid base64", param) from None
        source = io.BytesIO(data)
    elif url.startswith("file://") or url.startswith("/"):
        source = local_media(url.removeprefix("file://"), settings, param)
    else:
        raise bad("only data: URIs (and local files under --allowed_local_media_path) are accepted; this server "
                  "fetches no URLs", param)
    try:
        Image.MAX_IMAGE_PIXELS = settings.max_image_pixels  # larger images raise (decompression bombs)
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, Image.DecompressionBombError, SyntaxError, ValueError) as e:
        raise bad(f"the image does not decode: {e}", param) from None


def local_media(path: str, settings: ServeSettings, param: str) -> str:
    root = settings.allowed_local_media_path
    if not root:
        raise bad("local image files are refused: start the server with --allowed_local_media_path", param)
    real, allowed = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, allowed]) != allowed:
        raise ApiError(403, f"{path} is outside the allowed local media path", param, type_="permission_error")
    if not os.path.isfile(real):
        raise bad(f"image file not found: {path}", param)
    if os.path.getsize(real) > settings.max_image_bytes:
        raise ApiError(413, f"image over the {settings.max_image_bytes} byte limit", param)
    return real


def parse_messages(body: dict, settings: ServeSettings):
    """OpenAI messages -> (role, text with <image> placeholders) turns and decoded images."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("'messages' must be a non-empty list", "messages")
    turns, images = [], []
    for i, m in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad("each message must be an object with 'role' and 'content'", param)
        role = m.get("role")
        if role not in ROLE_NAMES:
            raise bad(f"unknown role {role!r}; expected one of {sorted(ROLE_NAMES)}", f"{param}.role")
        content = m.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list):
            pieces = []
            for j, part in enumerate(content):
                pparam = f"{param}.content[{j}]"
                kind = part.get("type") if isinstance(part, dict) else None
                if kind == "text" and isinstance(part.get("text"), str):
                    pieces.append(part["text"])
                elif kind == "image_url":
                    url = part.get("image_url")
                    url = url.get("url") if isinstance(url, dict) else url
                    if not isinstance(url, str):
                        raise bad("an image_url part needs image_url.url", pparam)
                    if len(images) >= settings.max_images:
                        raise bad(f"more than {settings.max_images} images in one request", pparam,
                                  "too_many_images")
                    images.append(decode_image(url, settings, pparam))
                    pieces.append(IMAGE_PLACEHOLDER)
                else:
                    raise bad("content parts must be {'type': 'text', 'text': ...} or "
                              "{'type': 'image_url', 'image_url': {'url': ...}}", pparam)
            text = "".join(pieces)
        else:
            raise bad("'content' must be a string or a list of parts", f"{param}.content")
        turns.append((ROLE_NAMES[role], text))
    try:
        conv = conversation_from_turns(turns, [f"image {k}" for k in range(len(images))])
    except DataError as e:
        raise bad(e.reason, "messages") from None
    return conv, images


def parse_options(body: dict, settings: ServeSettings) -> GenerationOptions:
    def number(key, kind=(int, float)):
        value = body.get(key)
        if value is not None and (not isinstance(value, kind) or isinstance(value, bool)):
            raise bad(f"'{key}' must be a number", key)
        return value

    max_tokens = number("max_completion_tokens", int)
    max_tokens = max_tokens if max_tokens is not None else number("max_tokens", int)
    if max_tokens is not None and max_tokens < 1:
        raise bad(f"max_tokens must be at least 1, got {max_tokens}", "max_tokens")
    temperature = number("temperature")
    if temperature is not None and not 0 <= temperature <= 2:
        raise bad("temperature must be in [0, 2]", "temperature")
    top_p = number("top_p")
    if top_p is not None and not 0 < top_p <= 1:
        raise bad("top_p must be in (0, 1]", "top_p")
    seed = number("seed", int)
    stop = body.get("stop")
    stop = [stop] if isinstance(stop, str) else stop or []
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise bad("'stop' must be a string or a list of up to 4 non-empty strings", "stop")
    if body.get("n", 1) != 1:
        raise bad("only n = 1 is supported", "n")
    return GenerationOptions(max_new_tokens=max_tokens or settings.default_max_tokens,
                             temperature=1.0 if temperature is None else float(temperature),
                             top_p=1.0 if top_p is None else float(top_p), seed=seed, stop=tuple(stop))


# ---- the app


def create_app(engine: Engine, settings: ServeSettings):
    batcher = Batcher(engine, settings.batch_window_s, settings.max_batch_size)
    max_len = settings.max_model_len or engine.max_length

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        batcher.close()

    app = FastAPI(title="mixtune", docs_url=None, redoc_url=None, lifespan=lifespan)
    app.state.batcher = batcher

    @app.exception_handler(ApiError)
    async def api_error(request, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        log.exception("request failed")
        return JSONResponse(ApiError(500, f"internal error: {type(exc).__name__}: {exc}",
                                     type_="server_error").body(), status_code=500)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        try:
            if request.url.path.startswith("/v1/") and settings.api_key:
                if request.headers.get("authorization") != f"Bearer {settings.api_key}":
                    raise ApiError(401, "invalid or missing API key (Authorization: Bearer <key>)",
                                   code="invalid_api_key", type_="authentication_error")
            length = request.headers.get("content-length")
            if length and length.isdigit() and int(length) > settings.max_body_bytes:
                raise ApiError(413, f"request body over the {settings.max_body_bytes} byte limit")
        except ApiError as e:
            return JSONResponse(e.body(), status_code=e.status)
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": settings.served_model_name, "object": "model",
                                            "created": int(time.time()), "owned_by": "mixtune",
                                            "max_model_len": max_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        raw = await request.body()
        if len(raw) > settings.max_body_bytes:
            raise ApiError(413, f"request body over the {settings.max_body_bytes} byte limit")
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise bad(f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise bad("the request body must be a JSON object")
        model = body.get("model")
        if model is not None and model != settings.served_model_name:
            raise ApiError(404, f"the model '{model}' does not exist; this server serves "
                                f"'{settings.served_model_name}'", "model", "model_not_found")
        options = parse_options(body, settings)
        conv, images = await run_in_threadpool(parse_messages, body, settings)
        inputs = await run_in_threadpool(prepare_inputs, engine, conv, images)
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if max_len and prompt_tokens + options.max_new_tokens > max_len:
            raise bad(f"the prompt has {prompt_tokens} tokens (images included) and max_tokens is "
                      f"{options.max_new_tokens}: over the model's {max_len}-token limit", "messages",
                      "context_length_exceeded")
        stream = bool(body.get("stream"))
        pending = Pending(inputs, options, asyncio.get_running_loop(), asyncio.Queue(), stream=stream)
        batcher.submit(pending)
        completion_id = f"chatcmpl-{uuid.uuid4().hex}"
        created = int(time.time())
        if not stream:
            kind, value = await pending.events.get()
            while kind == "text":
                kind, value = await pending.events.get()
            if kind == "error":
                raise value
            return {"id": completion_id, "object": "chat.completion", "created": created,
                    "model": settings.served_model_name,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": value.text},
                                 "finish_reason": value.finish_reason}],
                    "usage": usage_of(value)}
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        return StreamingResponse(sse_events(pending, completion_id, created, settings.served_model_name,
                                            include_usage), media_type="text/event-stream")

    return app


def prepare_inputs(engine: Engine, conv, images) -> dict:
    try:
        return engine.inputs(conv, images)
    except (ValueError, DataError) as e:  # e.g. the processor refuses an image count or size
        raise bad(f"the request cannot be encoded for this model: {e}", "messages") from None


async def sse_events(pending: Pending, completion_id: str, created: int, model: str, include_usage: bool):
    def chunk(delta: dict, finish=None, usage=None) -> str:
        body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
                "choices": [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]}
        if usage:
            body["usage"] = usage
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    while True:
        kind, value = await pending.events.get()
        if kind == "text":
            yield chunk({"content": value})
        elif kind == "error":
            yield f"data: {json.dumps(ApiError(500, str(value), type_='server_error').body())}\n\n"
            break
        else:
            yield chunk({}, value.finish_reason)
            if include_usage:
                yield chunk({}, usage=usage_of(value))
            break
    yield "data: [DONE]\n\n"


def serve(engine: Engine, settings: ServeSettings, host: str = "127.0.0.1", port: int = 8000) -> None:
    import uvicorn

    log.info("serving %s as '%s' on http://%s:%d/v1", engine.name, settings.served_model_name, host, port)
    uvicorn.run(create_app(engine, settings), host=host, port=port, log_level="info")
