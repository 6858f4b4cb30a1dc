"""The OpenAI-shaped request and response bodies (pydantic), and the error body every failure returns."""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt

# Fields the API defines that this server does not implement, with the only value it accepts for each
# (clients often send the neutral value explicitly; any other value is refused, naming the field).
NEUTRAL_VALUES: dict[str, tuple[Any, ...]] = {
    "n": (None, 1),
    "presence_penalty": (None, 0, 0.0),
    "frequency_penalty": (None, 0, 0.0),
    "logprobs": (None, False, 0),
    "top_logprobs": (None, 0),
    "echo": (None, False),
    "best_of": (None, 1),
    "logit_bias": (None, {}),
    "suffix": (None, ""),
    "parallel_tool_calls": (None,),
}


class StreamOptions(BaseModel):
    """``stream_options``: whether a last chunk carries the usage."""

    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class SamplingFields(BaseModel):
    """The fields chat and completion requests share: the model, sampling, stopping and streaming."""

    model_config = ConfigDict(extra="forbid")
    model: str
    max_tokens: Optional[StrictInt] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    top_k: Optional[StrictInt] = None  # an extension (vLLM has it too)
    seed: Optional[StrictInt] = None
    stop: Optional[Union[str, list[str]]] = None
    ignore_eos: StrictBool = False  # an extension: generate max_tokens whatever the model says (benchmarks)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    user: Optional[str] = None  # accepted and ignored, as an identifier for the caller's own logs
    n: Optional[StrictInt] = None
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logprobs: Optional[Union[StrictBool, StrictInt]] = None
    top_logprobs: Optional[StrictInt] = None
    logit_bias: Optional[dict[str, float]] = None

    def unsupported_field(self) -> Optional[str]:
        """The first field set to a value this server does not implement, or None."""
        for name, allowed in NEUTRAL_VALUES.items():
            if name in self.model_fields_set and getattr(self, name, None) not in allowed:
                return name
        return None

    def include_usage(self) -> bool:
        """Whether a streamed response ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class CompletionRequest(SamplingFields):
    """``POST /v1/completions``: a prompt as text, texts, token ids or lists of token ids."""

    prompt: Union[str, list[str], list[StrictInt], list[list[StrictInt]]]
    echo: Optional[StrictBool] = None
    best_of: Optional[StrictInt] = None
    suffix: Optional[str] = None


class TextPart(BaseModel):
    """One ``{"type": "text", "text": ...}`` part of a message's content."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of a conversation."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "user", "assistant"]
    content: Union[str, list[TextPart]]
    name: Optional[str] = None

    def text(self) -> str:
        """The content as one string (text parts joined)."""
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class ChatCompletionRequest(SamplingFields):
    """``POST /v1/chat/completions``: a conversation; ``max_completion_tokens`` is the newer ``max_tokens``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = None
    parallel_tool_calls: Optional[StrictBool] = None


class ApiError(Exception):
    """An error the server answers with ``status`` and the OpenAI error body."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: Optional[str] = None, code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        """``{"error": {"message", "type", "param", "code"}}``."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def new_id(prefix: str) -> str:
    """A fresh response id such as ``chatcmpl-3f2a...``."""
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    """Unix time in whole seconds (the ``created`` field)."""
    return int(time.time())


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    """The ``usage`` object."""
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_chunk(rid: str, created: int, model: str, index: int, text: str,
                     finish_reason: Optional[str]) -> dict[str, Any]:
    """One streamed ``text_completion`` chunk."""
    return {"id": rid, "object": "text_completion", "created": created, "model": model,
            "choices": [{"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}]}


def chat_chunk(rid: str, created: int, model: str, delta: dict[str, str],
               finish_reason: Optional[str]) -> dict[str, Any]:
    """One streamed ``chat.completion.chunk``."""
    return {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}


def usage_chunk(rid: str, created: int, model: str, object_: str, usage_: dict[str, int]) -> dict[str, Any]:
    """The last streamed chunk when ``stream_options.include_usage``: no choices, the usage."""
    return {"id": rid, "object": object_, "created": created, "model": model, "choices": [], "usage": usage_}
