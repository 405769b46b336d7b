"""The OpenAI chat-completions request (``POST /v1/chat/completions``), shared by the API and the inference server.

The fields and their ranges are OpenAI's (https://platform.openai.com/docs/api-reference/chat/create):
``temperature`` 0..2 (default 1), ``top_p`` 0..1 (default 1), up to 4 ``stop`` sequences, ``n`` choices,
``max_tokens`` or its newer name ``max_completion_tokens``, ``seed``, ``stream`` and
``stream_options.include_usage``. What this service cannot honour (tools, images, logprobs, penalties,
response formats) is refused with a 400 naming the field, never silently dropped: unknown fields are
refused as well (``extra="forbid"``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, ValidationInfo, field_validator

MAX_STOP_SEQUENCES = 4
"""OpenAI's limit on ``stop``."""
MAX_CHOICES = 8
"""Most choices (``n``) one request may ask for; each is generated in turn."""
MAX_MESSAGES = 1024


class TextPart(BaseModel):
    """A ``{"type": "text", "text": ...}`` content part (the only kind a text model can read)."""

    model_config = ConfigDict(extra="forbid")
    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message of the conversation. ``content`` is a string or a list of text parts."""

    model_config = ConfigDict(extra="forbid")
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = Field(None, max_length=64)

    def text(self) -> str:
        """The content as one string (text parts joined without separator, as OpenAI does)."""
        if isinstance(self.content, str):
            return self.content
        return "".join(part.text for part in self.content)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include_usage: StrictBool = False


class ChatCompletionRequest(BaseModel):
    """The request body. ``max_tokens`` and ``max_completion_tokens`` are the same limit (OpenAI renamed it);
    give one. ``temperature=0`` means greedy decoding. ``seed`` makes sampling reproducible on one server."""

    model_config = ConfigDict(extra="forbid")

    model: str = Field(min_length=1, max_length=300)
    messages: list[ChatMessage] = Field(min_length=1, max_length=MAX_MESSAGES)
    max_tokens: StrictInt | None = Field(None, ge=1)
    max_completion_tokens: StrictInt | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0.0, le=2.0)
    top_p: float | None = Field(None, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: StrictInt | None = Field(None, ge=0, le=2**63 - 1)
    n: StrictInt = Field(1, ge=1, le=MAX_CHOICES)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    min_tokens: StrictInt | None = Field(None, ge=0)
    """vLLM's extension: the end-of-sequence token is masked until this many tokens are generated (benchmarks
    and tests that need replies of a known length)."""
    user: str | None = Field(None, max_length=256)
    """Accepted for compatibility (an end-user id for abuse tracking); not used."""
    # Refused unless left at their neutral value (see _unsupported): accepted names, so the error is clear.
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: StrictBool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, Any] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None

    @field_validator("stop")
    @classmethod
    def _stop_not_empty(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > MAX_STOP_SEQUENCES:
            raise ValueError(f"at most {MAX_STOP_SEQUENCES} stop sequences are accepted, not {len(value)}")
        for s in [value] if isinstance(value, str) else value or []:
            if not s:
                raise ValueError("stop sequences must not be empty strings")
        return value

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_limit(cls, value: int | None, info: ValidationInfo) -> int | None:
        other = info.data.get("max_tokens")
        if value is not None and other is not None and value != other:
            raise ValueError("give max_tokens or max_completion_tokens, not both with different values")
        return value

    @field_validator("min_tokens")
    @classmethod
    def _min_under_max(cls, value: int | None, info: ValidationInfo) -> int | None:
        limit = info.data.get("max_completion_tokens") or info.data.get("max_tokens")
        if value is not None and limit is not None and value > limit:
            raise ValueError(f"min_tokens ({value}) is above the token limit ({limit})")
        return value

    @field_validator("frequency_penalty", "presence_penalty")
    @classmethod
    def _no_penalty(cls, value: float | None, info: ValidationInfo) -> float | None:
        if value not in (None, 0, 0.0):
            raise ValueError(f"{info.field_name} is not supported by this server; omit it or send 0")
        return value

    @field_validator("logprobs", "top_logprobs", "logit_bias", "tools", "tool_choice", "response_format")
    @classmethod
    def _unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        if value not in (None, False, [], {}):
            raise ValueError(f"{info.field_name} is not supported by this server; omit it")
        return value

    @field_validator("stream_options")
    @classmethod
    def _only_streaming(cls, value: StreamOptions | None, info: ValidationInfo) -> StreamOptions | None:
        if value is not None and not info.data.get("stream"):
            raise ValueError("stream_options is only allowed with stream=true")
        return value

    @property
    def token_limit(self) -> int | None:
        """``max_completion_tokens`` or ``max_tokens`` (None: up to the model's context)."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    @property
    def token_limit_param(self) -> str:
        """Which of the two names the caller used (for error messages)."""
        return "max_completion_tokens" if self.max_completion_tokens is not None else "max_tokens"

    @property
    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)
