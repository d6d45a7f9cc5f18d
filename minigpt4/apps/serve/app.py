"""The HTTP app: OpenAI's ``/v1/chat/completions``, ``/v1/models`` and a ``/health``, on a ``Chat``.

Thin by design: a request is validated into typed objects (:mod:`.protocol`), its messages become a
conversation through the very calls the demo makes (``new_conversation``, ``upload_img``, ``ask``,
assistant turns appended), and ``Chat.reply`` / ``Chat.stream_reply`` answer it through the chat's
engine, which batches concurrent requests. So an API answer is a ``Chat`` answer. Every failure
leaves as OpenAI's error shape with its status, and the server goes on serving.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException as StarletteHTTPException

from minigpt4.apps.serve import protocol
from minigpt4.apps.serve.images import ImageLimits, load_image
from minigpt4.apps.serve.protocol import APIError, ChatCompletionRequest, ImagePart, Message
from minigpt4.conversation import Chat, ContextTooLong, Conversation
from minigpt4.conversation.chat import Reply
from minigpt4.conversation.engines import EngineRequestError, EngineUnavailable, ImageBatcher
from minigpt4.prompts import IMAGE_PLACEHOLDER

logger = logging.getLogger(__name__)


@dataclass
class ServeSettings:
    model_name: str
    api_key: str | None = None
    max_queue: int = 64  # requests in the server at once, waiting or being answered; one more: 429
    max_body_bytes: int = 20 * 2**20
    max_images: int = 8
    max_tokens: int = 1024
    max_stop: int = 4
    max_stop_chars: int = 256  # each stop string's length
    images: ImageLimits = field(default_factory=ImageLimits)


class Service:
    """What the routes share: the chat, the limits, the threads that run the blocking work."""

    def __init__(self, chat: Chat, settings: ServeSettings):
        self.chat = chat
        self.settings = settings
        # Images of concurrent requests are encoded together (upload_img calls encode_images).
        chat.encode_images = ImageBatcher(chat.encode_images)
        # One thread per admitted request, so none waits for a thread while the engine could batch it.
        self.pool = ThreadPoolExecutor(max_workers=settings.max_queue + 2, thread_name_prefix="minigpt4-serve")
        self.active = 0  # admitted requests; changed on the event loop only

    # ---- checks that need no model ----
    def authorize(self, headers: Headers) -> None:
        if self.settings.api_key is None:
            return
        header = headers.get("authorization", "")
        if not header:
            raise APIError(401, "Missing API key: send it as 'Authorization: Bearer KEY'.", code="invalid_api_key")
        scheme, _, key = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), self.settings.api_key.encode()):
            raise APIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def parse(self, body: bytes) -> ChatCompletionRequest:
        try:
            raw = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise APIError(400, f"the request body is not valid JSON ({err})", code="invalid_json") from None
        except RecursionError:
            raise APIError(400, "the request body nests too deeply to be read", code="invalid_json") from None
        try:
            request = ChatCompletionRequest.model_validate(raw)
        except ValidationError as err:
            first = err.errors()[0]
            # loc holds pydantic's union tags too ("tagged-union[...]"): keep the field path only.
            param = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in first["loc"] if isinstance(p, int) or "[" not in str(p)).lstrip(".") or None
            # 400, as OpenAI answers a request it cannot take (clients raise BadRequestError for it).
            raise APIError(400, f"{param or 'body'}: {first['msg']}", param, "invalid_value") from None
        if request.model != self.settings.model_name:
            raise APIError(404, f"The model '{request.model}' does not exist; this server serves '{self.settings.model_name}'.", "model", "model_not_found")
        if request.n != 1:
            raise APIError(400, f"n: only 1 choice per request is supported, got {request.n}", "n", "unsupported_value")
        if (name := protocol.unsupported_field(request)) is not None:
            raise APIError(400, f"{name}: not supported by MiniGPT-4 (got {json.dumps(request.model_extra[name])[:200]})", name, "unsupported_parameter")
        check_messages(request.messages, self.settings.max_images)
        return request

    def generation(self, request: ChatCompletionRequest) -> tuple[dict[str, Any], tuple[str, ...], int | None]:
        """``Chat.reply`` keyword arguments: the request's settings over the model's configured decoding."""
        limit = self.settings.max_tokens
        defaults = self.chat.generation
        max_new = request.max_completion_tokens or request.max_tokens or min(defaults["max_new_tokens"], limit)
        if max_new > limit:
            raise APIError(400, f"max_tokens: at most {limit} on this server (--max-tokens), got {max_new}", "max_tokens", "invalid_value")
        kwargs: dict[str, Any] = {"max_new_tokens": max_new}
        # Temperature 0 is greedy; without one, the model's configured decoding (nano: greedy).
        kwargs["do_sample"] = defaults["do_sample"] if request.temperature is None else request.temperature > 0
        if kwargs["do_sample"]:
            kwargs["temperature"] = defaults["temperature"] if request.temperature is None else request.temperature
            kwargs["top_p"] = defaults["top_p"] if request.top_p is None else request.top_p
        stop = (request.stop,) if isinstance(request.stop, str) else tuple(request.stop or ())
        if len(stop) > self.settings.max_stop or not all(stop) or max(map(len, stop), default=0) > self.settings.max_stop_chars:
            raise APIError(400, f"stop: at most {self.settings.max_stop} non-empty strings of at most "
                           f"{self.settings.max_stop_chars} characters", "stop", "invalid_value")
        # A seed means something to sampling only; a greedy request with one may share a batch.
        return kwargs, stop, request.seed if kwargs["do_sample"] else None

    # ---- the blocking part, in a worker thread ----
    def conversation(self, messages: list[Message]) -> tuple[Conversation, list]:
        """The messages as a ``Chat`` conversation, built by the calls the demo makes, each image where the user put it."""
        chat = self.chat
        conv, img_list = chat.new_conversation(), []
        for i, message in enumerate(messages):
            parts = content_parts(message)
            if message.role == "assistant":
                conv.append_message(conv.roles[1], "".join(p.text for p in parts))
                continue
            for j, part in enumerate(parts):
                if isinstance(part, ImagePart):
                    param = f"messages[{i}].content[{j}].image_url"
                    chat.upload_img(load_image(part.image_url.url, self.settings.images, param), conv, img_list)
                elif part.text.strip():
                    chat.ask(part.text, conv)
        return conv, img_list

    def replies(self, request: ChatCompletionRequest, decode_partial: bool) -> Iterator[Reply]:
        """The answer as ``Chat.stream_reply`` writes it, streamed or not: closing the iterator
        between two pieces cancels it, so a client that leaves frees its row."""
        kwargs, stop, seed = self.generation(request)
        conv, img_list = self.conversation(request.messages)
        yield from self.chat.stream_reply(conv, img_list, stop=stop, seed=seed, truncate=False, decode_partial=decode_partial, **kwargs)

    # ---- admission ----
    def admit(self) -> None:
        if self.active >= self.settings.max_queue:
            raise APIError(429, f"The server is busy: {self.active} requests are in progress (--max-queue {self.settings.max_queue}); retry shortly.", code="queue_full")
        self.active += 1

    def release(self) -> None:
        self.active -= 1


def content_parts(message: Message) -> list:
    if isinstance(message.content, str):
        return [protocol.TextPart(type="text", text=message.content)]
    return list(message.content or [])


def check_messages(messages: list[Message], max_images: int) -> None:
    """The shape MiniGPT-4's templates can render: user turns (text and images), answered turns between, a user turn last."""
    images = 0
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if message.role in ("system", "developer"):
            raise APIError(400, f"{param}: {message.role} messages are not supported; MiniGPT-4's conversation template brings its own system prompt", param, "unsupported_value")
        parts = content_parts(message)
        if any(not isinstance(p, ImagePart) and IMAGE_PLACEHOLDER in p.text for p in parts):
            # The prompt is split at it to place the images: text cannot hold one.
            raise APIError(400, f"{param}: the text '{IMAGE_PLACEHOLDER}' is reserved for where images go; send images as image_url parts", param, "invalid_value")
        has_text = any(not isinstance(p, ImagePart) and p.text.strip() for p in parts)
        n_images = sum(isinstance(p, ImagePart) for p in parts)
        if message.role == "assistant":
            if i == 0 or messages[i - 1].role == "assistant":
                raise APIError(400, f"{param}: an assistant message must follow a user message", param, "invalid_value")
            if n_images or not has_text:
                raise APIError(400, f"{param}: an assistant message needs text and no images", param, "invalid_value")
        elif not (has_text or n_images):
            raise APIError(400, f"{param}: the message has neither text nor an image", param, "invalid_value")
        images += n_images
    if messages[-1].role != "user":
        raise APIError(400, "messages: the last message must be the user's", "messages", "invalid_value")
    if images > max_images:
        raise APIError(400, f"messages: {images} images; at most {max_images} per request (--max-images)", "messages", "too_many_images")


def error_response(err: Exception) -> JSONResponse:
    """Any failure as OpenAI's error body with its status; unexpected ones are logged with their traceback."""
    if isinstance(err, APIError):
        api = err
    elif isinstance(err, EngineUnavailable):
        api = APIError(503, f"The model backend is unavailable: {err}", code="engine_unavailable")
    elif isinstance(err, EngineRequestError):
        api = APIError(400, str(err), code="invalid_value")
    elif isinstance(err, ContextTooLong):
        api = APIError(400, f"messages: {err}; send a shorter conversation or a smaller max_tokens", "messages", "context_length_exceeded")
    else:
        logger.error("request failed", exc_info=err)
        api = APIError(500, f"The server failed on this request ({type(err).__name__}: {err}).", code="internal_error")
    return JSONResponse(api.body(), status_code=api.status)


async def in_thread(service: Service, fn: Callable[[], Any]) -> Any:
    return await asyncio.get_running_loop().run_in_executor(service.pool, fn)


_END = object()


async def thread_iter(service: Service, make: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """The items of a blocking iterator, produced in a worker thread; leaving early closes it there."""
    loop = asyncio.get_running_loop()
    items: asyncio.Queue = asyncio.Queue()
    leave = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(items.put_nowait, item)
        except RuntimeError:  # the loop is gone: nobody is listening
            leave.set()

    def run() -> None:
        iterator = make()
        try:
            for item in iterator:
                put(item)
                if leave.is_set():
                    break
        except BaseException as err:
            put(err)
        finally:
            iterator.close()  # a client that left frees its row in the engine's batch
            put(_END)

    loop.run_in_executor(service.pool, run)
    try:
        while (item := await items.get()) is not _END:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        leave.set()


async def finished(replies: AsyncIterator[Reply]) -> Reply:
    """The finished reply, past the pieces before it."""
    async for reply in replies:
        if reply.result is not None:
            return reply
    raise RuntimeError("the answer ended without its result")


async def unless_client_leaves(request: Request, work: Awaitable[Any]) -> tuple[bool, Any]:
    """``(True, result of work)``, or ``(False, None)`` with ``work`` cancelled once the client has gone."""

    async def left() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    task, watcher = asyncio.ensure_future(work), asyncio.ensure_future(left())
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
        if not task.done():  # the client left (or this handler is being cancelled)
            task.cancel()
            await asyncio.wait({task})  # its async generators close before anyone touches them
    if task.cancelled():
        return False, None
    return True, task.result()


async def sse(service: Service, request: ChatCompletionRequest, first: Reply | None, rest: AsyncIterator[Reply]) -> AsyncIterator[str]:
    """OpenAI's chunks as server-sent events: the role, text deltas, the finish, the usage, ``[DONE]``."""
    id_, model = protocol.completion_id(), service.settings.model_name
    sent = ""

    def event(body: dict[str, Any]) -> str:
        return f"data: {json.dumps(body)}\n\n"

    try:
        yield event(protocol.chunk(id_, model, {"role": "assistant", "content": ""}))
        reply = first
        while reply is not None:
            if reply.text.startswith(sent) and len(reply.text) > len(sent):
                yield event(protocol.chunk(id_, model, {"content": reply.text[len(sent):]}))
                sent = reply.text
            if reply.result is not None:
                result = reply.result
                yield event(protocol.chunk(id_, model, {}, result.finish_reason))
                if request.stream_options and request.stream_options.include_usage:
                    yield event(protocol.chunk(id_, model, None, usage_=protocol.usage(result.prompt_tokens, result.completion_tokens)))
                break
            reply = await anext(rest, None)
    except Exception as err:  # after the headers: the error goes as an event, as OpenAI's does
        yield event(json.loads(error_response(err).body))
    finally:
        service.release()
        await rest.aclose()
    yield "data: [DONE]\n\n"


def create_app(chat: Chat, settings: ServeSettings) -> FastAPI:
    """The FastAPI app serving ``chat`` (build the chat with ``reuse_kv_cache=False``: requests share no cache)."""
    service = Service(chat, settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        service.pool.shutdown(wait=False)
        chat.engine.close()

    app = FastAPI(title="MiniGPT-4", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.service = service
    app.add_middleware(BodyLimit, max_bytes=settings.max_body_bytes, authorize=service.authorize)

    async def handle(request: Request, err: Exception) -> JSONResponse:
        return error_response(err)

    async def handle_http(request: Request, err: StarletteHTTPException) -> JSONResponse:  # unknown route, wrong method
        return JSONResponse(APIError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    # Expected failures are answered here; anything else also reaches Exception (500) and is logged.
    for kind in (APIError, EngineUnavailable, EngineRequestError, ContextTooLong, Exception):
        app.add_exception_handler(kind, handle)
    app.add_exception_handler(StarletteHTTPException, handle_http)

    @app.get("/health")
    async def health() -> JSONResponse:
        check = getattr(chat.engine, "health", None)
        if check is not None:
            await in_thread(service, check)
        return JSONResponse({"status": "ok", "model": settings.model_name, "engine": chat.engine.name, "in_progress": service.active})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        service.authorize(request.headers)
        return JSONResponse({"object": "list", "data": [{"id": settings.model_name, "object": "model", "created": 0, "owned_by": "minigpt4"}]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        # The key was checked before the body was read (BodyLimit); parsing a large body would hold the event loop.
        body = await asyncio.to_thread(service.parse, await request.body())
        service.admit()
        if not body.stream:
            replies = thread_iter(service, lambda: service.replies(body, decode_partial=False))
            try:
                answered, reply = await unless_client_leaves(request, finished(replies))
            finally:
                service.release()
                await replies.aclose()
            if not answered:  # nobody is there to read a response
                return Response(status_code=499)
            result = reply.result
            return JSONResponse(protocol.completion(protocol.completion_id(), settings.model_name, reply.text, result.finish_reason, result.prompt_tokens, result.completion_tokens))
        replies = thread_iter(service, lambda: service.replies(body, decode_partial=True))
        try:
            # The first piece comes before any header: a bad image or a backend that is down still gets its status.
            first = await anext(replies, None)
        except BaseException:
            service.release()
            raise
        return StreamingResponse(sse(service, body, first, replies), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    return app


class BodyLimit:
    """ASGI middleware: a request with a body is authorized on its headers before any of the body is
    kept (``authorize``: 401), and a body over ``max_bytes`` gets 413 before the app sees it.

    The body is read here (the app needs it whole anyway) and handed on. A refused one is read to
    the end without being kept, up to a bound, so the client, still sending, gets to read the answer.
    """

    def __init__(self, app: Callable, max_bytes: int, authorize: Callable[[Headers], None], drain_bytes: int = 256 * 2**20):
        self.app, self.max_bytes, self.authorize, self.drain_bytes = app, max_bytes, authorize, drain_bytes

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        refusal = None
        if scope["method"] not in ("GET", "HEAD", "OPTIONS"):
            try:
                self.authorize(Headers(scope=scope))
            except APIError as err:
                refusal = err
        body, size, more = bytearray(), 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if refusal is None and size <= self.max_bytes:
                body += chunk
            more = message.get("more_body", False)
            if size > self.drain_bytes:
                break
        if refusal is None and size > self.max_bytes:
            refusal = APIError(413, f"The request body is over {self.max_bytes} bytes (--max-body-mb).", code="request_too_large")
        if refusal is not None:
            return await JSONResponse(refusal.body(), status_code=refusal.status)(scope, receive, send)
        replayed = False

        async def replay():
            nonlocal replayed
            if replayed:
                return await receive()  # after the body: the client's disconnect, for streaming responses
            replayed = True
            return {"type": "http.request", "body": bytes(body), "more_body": False}

        await self.app(scope, replay, send)
