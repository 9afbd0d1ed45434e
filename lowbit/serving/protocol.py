"""Request bodies of the OpenAI API subset lowbit serves, and its error body."""

from __future__ import annotations

from typing import Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from lowbit.runtime.sampling import SamplingParams


class _Sampling(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: Optional[str] = None
    max_tokens: Optional[int] = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    top_k: int = Field(default=0, ge=0)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return SamplingParams(
            max_tokens=self.max_tokens or default_max_tokens,
            temperature=self.temperature,
            top_k=self.top_k,
            top_p=self.top_p,
            seed=self.seed,
            stop=stop,
        )


class CompletionRequest(_Sampling):
    prompt: Union[str, list[str]]


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str


class ChatCompletionRequest(_Sampling):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(default=None, ge=1)

    def sampling(self, default_max_tokens: int) -> SamplingParams:
        params = super().sampling(default_max_tokens)
        if self.max_completion_tokens:
            params.max_tokens = self.max_completion_tokens
        return params


def error_body(message: str, type_: str = "invalid_request_error", param: Optional[str] = None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}
