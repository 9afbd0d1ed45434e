"""Request bodies of the OpenAI API subset lowbit serves, and its error body.

Fields are read as the official client sends them: integers are strict (``max_tokens: true`` is refused, not
taken as 1), ``top_p: 0`` keeps only the most likely token, the ``developer`` role is a system message, message
content may be a list of text parts, an assistant message may have ``content: null``. What lowbit does not do
(``n`` > 1, non-text content) is refused with a 400 that says so, never silently ignored.
"""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, field_validator, model_validator

from lowbit.runtime.sampling import SamplingParams


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, ge=0, le=1)
    top_k: StrictInt = Field(default=0, ge=0)
    seed: Optional[StrictInt] = None
    stop: Optional[Union[str, list[str]]] = Field(default=None)
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    n: StrictInt = 1
    presence_penalty: float = Field(default=0.0, ge=-2, le=2)
    frequency_penalty: float = Field(default=0.0, ge=-2, le=2)

    @field_validator("n")
    @classmethod
    def _one_choice(cls, n: int) -> int:
        if n != 1:
            raise ValueError(f"n = {n} is not supported: lowbit returns one choice a request; send n requests")
        return n

    @field_validator("stop")
    @classmethod
    def _few_stops(cls, stop):
        if isinstance(stop, list) and len(stop) > 4:
            raise ValueError(f"at most 4 stop sequences, got {len(stop)}")
        return stop

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)

    def sampling(self, max_tokens: int) -> SamplingParams:
        """The sampling parameters, generating at most ``max_tokens`` (the request's own limit, or a default the
        caller clamped to the context left)."""
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
        )

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_tokens


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]
    logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=5)


class TextPart(BaseModel):
    type: str
    text: str = ""

    @model_validator(mode="after")
    def _text_only(self):
        if self.type != "text":
            raise ValueError(f"content parts of type {self.type!r} are not supported: lowbit serves text models")
        return self


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant"]
    content: Optional[Union[str, list[TextPart]]] = Field(default=None, union_mode="left_to_right")

    @model_validator(mode="after")
    def _content(self):
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        return self

    def as_template_message(self) -> dict:
        """The message as chat templates take it: developer is system, text parts joined, null content empty."""
        content = self.content or ""
        if isinstance(content, list):
            content = "".join(part.text for part in content)
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[StrictInt] = Field(default=None, ge=1)
    logprobs: StrictBool = False
    top_logprobs: Optional[StrictInt] = Field(default=None, ge=0, le=20)

    @model_validator(mode="after")
    def _top_logprobs_need_logprobs(self):
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def requested_max_tokens(self) -> Optional[int]:
        return self.max_completion_tokens or self.max_tokens


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
