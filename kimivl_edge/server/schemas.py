"""Request bodies (pydantic; unknown fields are ignored, as clients send their own: Open WebUI's ``cache_control``
and ``reasoning``), and their translation to the runtime's messages and sampling settings."""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore", populate_by_name=True)


class ImageURL(_Body):
    url: str


class FileData(_Body):
    """OpenAI's ``file`` part: only inline ``file_data`` (a ``data:application/pdf;base64,...`` URI) is served."""

    file_data: str | None = None
    filename: str | None = None
    file_id: str | None = None


class ContentPart(_Body):
    type: str
    text: str | None = None
    image_url: ImageURL | str | None = None
    video_url: ImageURL | str | None = None   # vLLM's video part: a data URI or a path under --media-dir
    file: FileData | None = None


class Message(_Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[ContentPart] | None = None


class StreamOptions(_Body):
    include_usage: bool = False


class JsonSchema(_Body):
    name: str | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")


class ResponseFormat(_Body):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchema | None = None
    schema_: dict[str, Any] | None = Field(default=None, alias="schema")  # llama-server's json_object + schema


class ChatRequest(_Body):
    model: str | None = None
    messages: list[Message] = Field(min_length=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float = Field(default=1.0, gt=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    response_format: ResponseFormat | None = None
    reasoning_format: Literal["deepseek", "none"] | None = None  # llama-server's per-request switch
    return_progress: bool = False  # llama-server's: prompt_progress chunks while the prompt is evaluated (streams)

    @property
    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class TokenizeRequest(_Body):
    content: str
    parse_special: bool = True  # special-token strings (<|im_end|>, ...) become their ids


class DetokenizeRequest(_Body):
    tokens: list[int]
