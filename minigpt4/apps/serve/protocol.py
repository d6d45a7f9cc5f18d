"""The OpenAI chat-completions protocol, as far as MiniGPT-4 speaks it: typed requests, the
response and stream-chunk shapes, and OpenAI's error shape with the status that goes with it."""
from __future__ import annotations

import time
import uuid
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None  # OpenAI's resolution hint; MiniGPT-4 has one input size


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(BaseModel):
    # "system" is read so it can be refused with a reason: the template brings its own.
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


INT64 = 2**63


class ChatCompletionRequest(BaseModel):
    """``POST /v1/chat/completions``.

    Fields OpenAI has and MiniGPT-4 cannot honour are refused when they ask for something
    (:data:`UNSUPPORTED`: ``logprobs: true``, tools, a JSON response format, penalties) and read
    past at their neutral values, as clients send them; other unknown fields are ignored.
    """

    model_config = ConfigDict(extra="allow")

    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)  # the newer name of max_tokens
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-INT64, lt=INT64)  # OpenAI's: a 64-bit integer
    n: int = Field(1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None


# Fields that change what OpenAI would answer, and their values that ask for nothing.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "logprobs": (None, False),
    "top_logprobs": (None, 0),
    "tools": (None, []),
    "tool_choice": (None, "none"),
    "functions": (None, []),
    "function_call": (None, "none"),
    "response_format": (None, {"type": "text"}),
    "logit_bias": (None, {}),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "modalities": (None, ["text"]),
    "audio": (None,),
    "prediction": (None,),
}


def unsupported_field(request: ChatCompletionRequest) -> str | None:
    """The first field of ``request`` that asks for something MiniGPT-4 cannot do, or None."""
    extra = request.model_extra or {}
    return next((name for name, neutral in UNSUPPORTED.items() if name in extra and extra[name] not in neutral), None)


class APIError(Exception):
    """A request that fails with ``status`` and OpenAI's error body."""

    TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error",
             500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict[str, Any]:
        kind = self.TYPES.get(self.status, "invalid_request_error" if self.status < 500 else "server_error")
        return {"error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}}


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion(id_: str, model: str, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "id": id_,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": None, "finish_reason": finish_reason}],
        "usage": usage(prompt_tokens, completion_tokens),
    }


def chunk(id_: str, model: str, delta: dict[str, Any] | None, finish_reason: str | None = None, usage_: dict[str, int] | None = None) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``delta`` None: the usage chunk, which has no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]
    body: dict[str, Any] = {"id": id_, "object": "chat.completion.chunk", "created": int(time.time()), "model": model, "choices": choices}
    if usage_ is not None:
        body["usage"] = usage_
    return body
