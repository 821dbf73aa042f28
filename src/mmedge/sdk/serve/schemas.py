"""Request bodies: OpenAI's chat-completion and embedding shapes, and mmedge's search and index
shapes. Strict: unknown fields, wrong types and out-of-range values are 400s before any work."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmedge.runtime.chat_template import MAX_IMAGES, MAX_MESSAGES
from mmedge.runtime.generation import MAX_STOP_STRINGS
from mmedge.runtime.retrieval import MAX_BATCH_ITEMS
from mmedge.runtime.texts import TextLimits
from mmedge.runtime.usearch_file import FREE_KEY

MAX_TEXT = TextLimits().max_chars  # the runtime's cap on one text, checked here before queueing
ModelName = Annotated[str, Field(min_length=1, max_length=256)]
Text = Annotated[str, Field(max_length=MAX_TEXT)]
Url = Annotated[str, Field(min_length=1)]  # bounded by the body size; data URLs carry whole images
Id = Annotated[int, Field(ge=0, lt=FREE_KEY)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class TextPart(_Strict):
    type: Literal["text"]
    text: Text


class ImageUrl(_Strict):
    url: Url
    detail: Literal["auto", "low", "high"] | None = (
        None  # accepted for compatibility; images are sized by the package
    )


class ImagePart(_Strict):
    type: Literal["image_url"]
    image_url: ImageUrl


Part = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class Message(_Strict):
    role: Literal["system", "user", "assistant"]
    content: Text | Annotated[list[Part], Field(min_length=1, max_length=64)]


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: ModelName
    messages: Annotated[list[Message], Field(min_length=1, max_length=MAX_MESSAGES)]
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] | None = None
    top_p: Annotated[float, Field(gt=0, le=1)] | None = None
    seed: Annotated[int, Field(ge=0, lt=2**63)] | None = None
    stop: (
        Annotated[str, Field(min_length=1, max_length=256)]
        | Annotated[
            list[Annotated[str, Field(min_length=1, max_length=256)]], Field(max_length=MAX_STOP_STRINGS)
        ]
        | None
    ) = None
    stream: bool = False
    stream_options: StreamOptions | None = None

    @model_validator(mode="after")
    def _images_capped(self) -> ChatRequest:
        images = sum(
            isinstance(p, ImagePart) for m in self.messages if isinstance(m.content, list) for p in m.content
        )
        if images > MAX_IMAGES:
            raise ValueError(f"{images} images in one conversation; the limit is {MAX_IMAGES}")
        return self


class ImageInput(_Strict):
    """mmedge's extension of the embeddings input: `{"image": "<image URL>"}` embeds an image."""

    image: Url


class EmbeddingRequest(_Strict):
    model: ModelName
    input: Text | Annotated[list[Text | ImageInput], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]
    encoding_format: Literal["float", "base64"] = "float"


class SearchRequest(_Strict):
    model: ModelName
    query: Text | ImageInput
    k: Annotated[int, Field(ge=1, le=1000)] = 5


class IndexItem(_Strict):
    id: Id
    text: Text | None = None
    image: Url | None = None
    label: Annotated[str, Field(max_length=4096)] | None = None

    @model_validator(mode="after")
    def _one_source(self) -> IndexItem:
        if (self.text is None) == (self.image is None):
            raise ValueError("an index item has exactly one of 'text' and 'image'")
        return self


class IndexAddRequest(_Strict):
    model: ModelName
    items: Annotated[list[IndexItem], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]

    @model_validator(mode="after")
    def _labels_all_or_none(self) -> IndexAddRequest:
        if len({item.label is None for item in self.items}) > 1:
            raise ValueError("give a label to every item or to none")
        return self


class IndexRemoveRequest(_Strict):
    model: ModelName
    ids: Annotated[list[Id], Field(min_length=1, max_length=MAX_BATCH_ITEMS)]
