"""The OpenAI-shaped requests the server accepts, their limits, and its error bodies.

Validation is explicit so that every bad request gets a 4xx with the OpenAI error shape
(`{"error": {"message", "type", "param", "code"}}`) naming the field, rather than FastAPI's
own 422 format or a crash. Fields are strict, as OpenAI's are ("stream": "yes" is refused,
not read as true); text must be valid Unicode (no lone surrogates, which no tokenizer takes);
a seed must fit the generator's 64 bits; JSON nested too deeply for the parser is a 400.
"""
from __future__ import annotations

import base64
import binascii
import json
import re
from dataclasses import dataclass
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

SEED_MIN, SEED_MAX = -(1 << 63), (1 << 64) - 1  # what torch.Generator.manual_seed accepts


@dataclass(frozen=True)
class ServeLimits:
    max_batch: int = 32  # requests decoded together
    max_queue: int = 256  # requests waiting beyond this get 503
    max_prompt_tokens: int = 0  # 0: the model's context length minus one
    max_new_tokens: int = 512  # the largest max_tokens a request may ask for
    max_request_bytes: int = 1 << 20
    max_stop_strings: int = 4
    batch_wait_s: float = 0.005  # how long a new batch waits for more requests to join it
    max_image_bytes: int = 4 << 20  # one image of a chat message, decoded from its data URL
    max_images: int = 4  # images a request may hold

    def __post_init__(self):
        for name in ("max_batch", "max_queue", "max_new_tokens", "max_request_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"serve limit {name}={getattr(self, name)} must be >= 1")
        if self.max_prompt_tokens < 0:
            raise ValueError(f"serve limit max_prompt_tokens={self.max_prompt_tokens} must be >= 0 (0: the context)")


class ApiError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code = status, message, param, kind, code

    def body(self) -> dict:
        """OpenAI's shape: `code` is a machine-readable string ("model_not_found") or null."""
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


def _unicode(text: str) -> str:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode (lone surrogate at character {e.start})") from None
    return text


Text = Annotated[str, AfterValidator(_unicode)]


class _Sampled(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    top_k: int = Field(default=0, ge=0)
    n: Literal[1] = 1
    stream: bool = False
    stop: Text | list[Text] | None = None
    seed: int | None = Field(default=None, ge=SEED_MIN, le=SEED_MAX)

    def stop_strings(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]


class CompletionRequest(_Sampled):
    prompt: Text | list[Text]

    def prompt_text(self) -> str:
        if isinstance(self.prompt, list):
            if len(self.prompt) != 1:
                raise ApiError(400, "prompt: exactly one prompt per request is supported", "prompt")
            return self.prompt[0]
        return self.prompt


class TextPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: Text


class ImageURL(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    url: str


class ImagePart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "user", "assistant"]
    content: Text | list[Annotated[TextPart | ImagePart, Field(discriminator="type")]]

    def pieces(self) -> list[str | ImageURL]:
        if isinstance(self.content, str):
            return [self.content]
        return [p.text if isinstance(p, TextPart) else p.image_url for p in self.content]


DATA_URL = re.compile(r"data:image/[a-zA-Z0-9.+-]+;base64,(.*)", re.DOTALL)


def image_bytes(url: ImageURL, limits: ServeLimits) -> bytes:
    """The bytes of an inline image (`data:image/...;base64,...`); remote URLs are never fetched."""
    if url.url.startswith(("http://", "https://")):
        raise ApiError(400, "image_url: remote URLs are not fetched; send the image inline as "
                            "data:image/png;base64,...", "image_url")
    match = DATA_URL.fullmatch(url.url)
    if not match:
        raise ApiError(400, "image_url: must be a data URL, data:image/<type>;base64,<data>", "image_url")
    if len(match.group(1)) > limits.max_image_bytes * 4 // 3 + 4:
        raise ApiError(400, f"image_url: the image exceeds {limits.max_image_bytes} bytes", "image_url")
    try:
        return base64.b64decode(match.group(1), validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image_url: the data is not valid base64", "image_url") from None


class ChatRequest(_Sampled):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)

    def prompt_pieces(self) -> list[str | ImageURL]:
        """A plain role-prefixed transcript ending with the assistant's turn (Tessera models have no chat
        template), as text with the images of the messages where they stand."""
        out: list[str | ImageURL] = []
        for m in self.messages:
            out += [f"{m.role}: ", *m.pieces(), "\n"]
        return [*out, "assistant:"]

    def prompt_text(self) -> str:
        pieces = self.prompt_pieces()
        if not all(isinstance(p, str) for p in pieces):
            raise ApiError(400, "messages: this model takes no images (serve a tessera vlm checkpoint)", "messages")
        return "".join(pieces)


def parse_request(raw: bytes, cls: type[_Sampled], limits: ServeLimits) -> _Sampled:
    """The validated request in `raw`, or ApiError(400/413) naming what is wrong."""
    if len(raw) > limits.max_request_bytes:
        raise ApiError(413, f"request body of {len(raw)} bytes exceeds {limits.max_request_bytes}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ApiError(400, f"request body is not valid JSON: {e}") from None
    except RecursionError:
        raise ApiError(400, "request body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ApiError(400, "request body must be a JSON object")
    try:
        req = cls.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"] if not _union_member(p)) or None
        raise ApiError(400, f"{param}: {first['msg']}", param) from None
    if len(req.stop_strings()) > limits.max_stop_strings:
        raise ApiError(400, f"stop: at most {limits.max_stop_strings} stop strings", "stop")
    return req


def _union_member(part: str | int) -> bool:
    """Whether a part of pydantic's error location names the member of a union tried ("str",
    "list[str]", "function-after[...]") rather than a field or an index."""
    return isinstance(part, str) and ("[" in part or part in ("str", "int", "float", "bool"))


def check_lengths(prompt_tokens: int, max_tokens: int, limits: ServeLimits, context: int) -> None:
    """Prompt and completion must fit the limits and, together, the model's context window."""
    max_prompt = limits.max_prompt_tokens or context - 1
    if prompt_tokens == 0:
        raise ApiError(400, "prompt: must not be empty", "prompt")
    if prompt_tokens > max_prompt:
        raise ApiError(400, f"prompt: {prompt_tokens} tokens exceed the limit of {max_prompt}", "prompt")
    if max_tokens < 1:
        raise ApiError(400, f"max_tokens: the prompt ({prompt_tokens} tokens) leaves no room in the context of {context}", "max_tokens")
    if max_tokens > limits.max_new_tokens:
        raise ApiError(400, f"max_tokens: {max_tokens} exceeds the limit of {limits.max_new_tokens}", "max_tokens")
    if prompt_tokens + max_tokens > context:
        raise ApiError(400, f"max_tokens: prompt ({prompt_tokens}) + max_tokens ({max_tokens}) exceed the "
                            f"model's context of {context} tokens", "max_tokens")
