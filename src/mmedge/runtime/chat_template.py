"""Conversations -> LLM input items through a package's Jinja chat template, in a sandbox.

A conversation is a list of messages, `{"role": "system"|"user"|"assistant", "content": str | parts}`,
parts being `{"type": "text", "text": ...}` or `{"type": "image", ...}` (the image itself travels
beside, in order). The template comes from the package, so it is untrusted code:

- it runs in Jinja's `ImmutableSandboxedEnvironment` (no Python attributes, no mutation of the
  inputs), with the helpers HF templates use (`raise_exception`, `tojson`, `strftime_now`,
  `{% generation %}`), and its output is capped in size;
- user text never passes through it: the template sees a unique marker per text and the text is
  put back afterwards, so a typed "<image>" or "[INST]" cannot become an image slot or a special
  token, and the template cannot rewrite it;
- images are where the template writes the package's image placeholder (outside user text); their
  number must equal the number of images given.

The rendered text is tokenised as HF processors do (`TextTokenizer.encode_template`); each image
placeholder token becomes one image slot (`None`) for the chat pipeline to fill.
"""

from __future__ import annotations

import datetime as _dt
import json
import re
import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from mmedge.errors import ConfigError, InvalidInputError
from mmedge.runtime.prompts import Item
from mmedge.runtime.sections import ChatTemplate
from mmedge.runtime.texts import TextTokenizer

ROLES = ("system", "user", "assistant")
MAX_MESSAGES = 1024
MAX_IMAGES = 16  # per conversation
MAX_RENDERED_CHARS = 1 << 20


class TemplateChat:
    """Renders and tokenises conversations with a package's chat template."""

    def __init__(self, section: ChatTemplate, tokenizer: TextTokenizer):
        import jinja2
        from jinja2.ext import Extension, loopcontrols
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class _Generation(Extension):
            """`{% generation %}...{% endgeneration %}` (HF's assistant-mask tag): renders its body."""

            tags = {"generation"}  # noqa: RUF012  (Extension declares it a set)

            def parse(self, parser: Any) -> Any:
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.Scope(body, lineno=lineno)

        self.section, self.tokenizer = section, tokenizer
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=[_Generation, loopcontrols], autoescape=False
        )
        env.filters["tojson"] = _tojson
        env.globals["raise_exception"] = _raise
        env.globals["strftime_now"] = lambda fmt: _dt.datetime.now().strftime(str(fmt))
        try:
            self.template = env.from_string(section.template)
        except jinja2.TemplateError as exc:
            raise ConfigError(f"the package's chat template is malformed: {exc}") from None
        image_id = tokenizer.token_id(section.image_token)
        if image_id is None:
            raise ConfigError(
                f"the image placeholder {section.image_token!r} is not a token of the tokenizer"
            )
        self.image_id = image_id

    def render(
        self, messages: Sequence[Mapping[str, Any]], add_generation_prompt: bool = True
    ) -> list[tuple[str, bool]]:
        """The rendered conversation as (text, plain) pieces: the template's own text (plain=False)
        and user text put back verbatim (plain=True)."""
        import jinja2
        from jinja2.sandbox import SecurityError

        nonce = secrets.token_hex(8)
        texts: list[str] = []

        def hold(text: Any, where: str) -> str:
            if not isinstance(text, str):
                raise InvalidInputError(f"{where} must be a string, got {type(text).__name__}")
            if len(text) > self.tokenizer.limits.max_chars:
                raise InvalidInputError(
                    f"{where} has {len(text)} characters; the limit is {self.tokenizer.limits.max_chars}"
                )
            texts.append(text)
            return f"\ue000{nonce}:{len(texts) - 1}\ue001"

        shown = [_held(m, i, hold) for i, m in enumerate(checked_messages(messages))]
        context = {
            "messages": shown,
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self.section.bos_token,
            "eos_token": self.section.eos_token,
        }
        try:
            out = _capped(self.template.generate(**context))
        except SecurityError as exc:
            raise ConfigError(f"the chat template tried something the sandbox forbids: {exc}") from None
        except _TemplateRaisedError as exc:
            raise InvalidInputError(f"the chat template refused the conversation: {exc}") from None
        except jinja2.TemplateError as exc:
            raise ConfigError(f"the chat template failed: {exc}") from None
        except (TypeError, ValueError, KeyError, AttributeError, IndexError, ZeroDivisionError) as exc:
            raise ConfigError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
        pieces: list[tuple[str, bool]] = []
        for i, part in enumerate(re.split(f"\ue000{nonce}:(\\d+)\ue001", out)):
            if i % 2:
                pieces.append((texts[int(part)], True))
            elif part:
                pieces.append((part, False))
        return pieces

    def encode(
        self, messages: Sequence[Mapping[str, Any]], images: int, add_generation_prompt: bool = True
    ) -> list[Item]:
        """Token ids of the conversation, with `None` at each image's place; `images` is how many
        images the messages carry (the template must place exactly that many)."""
        pieces = self.render(messages, add_generation_prompt)
        placed = sum(text.count(self.section.image_token) for text, plain in pieces if not plain)
        if placed != images:
            raise InvalidInputError(
                f"the conversation carries {images} image(s) but the chat template places {placed}; "
                "give one image part per image"
            )
        ids = self.tokenizer.encode_template(pieces, self.section.add_special_tokens)
        items: list[Item] = [None if i == self.image_id else i for i in ids]
        if items.count(None) != images:  # a placeholder merged with neighbouring text by the tokenizer
            raise ConfigError(
                f"the tokenizer did not keep the image placeholder {self.section.image_token!r} as one token"
            )
        return items


def checked_messages(messages: Any) -> list[Mapping[str, Any]]:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise InvalidInputError("messages must be a list of {'role': ..., 'content': ...} objects")
    if not messages:
        raise InvalidInputError("messages is empty")
    if len(messages) > MAX_MESSAGES:
        raise InvalidInputError(f"{len(messages)} messages; the limit is {MAX_MESSAGES}")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or set(m) - {"role", "content"} or "role" not in m:
            raise InvalidInputError(f"messages[{i}] must be an object with 'role' and 'content' only")
        if m["role"] not in ROLES:
            raise InvalidInputError(f"messages[{i}] has role {m['role']!r}; accepted: {list(ROLES)}")
    return list(messages)


def content_parts(message: Mapping[str, Any], i: int) -> list[Mapping[str, Any]]:
    """A message's content as parts (a plain string is one text part); parts are checked."""
    content = message.get("content", "")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, Sequence) or isinstance(content, bytes):
        raise InvalidInputError(f"messages[{i}].content must be a string or a list of parts")
    for j, part in enumerate(content):
        if not isinstance(part, Mapping) or part.get("type") not in ("text", "image"):
            raise InvalidInputError(
                f"messages[{i}].content[{j}] must be a {{'type': 'text'|'image', ...}} part"
            )
        if part["type"] == "text" and not isinstance(part.get("text"), str):
            raise InvalidInputError(f"messages[{i}].content[{j}].text must be a string")
    return list(content)


def _held(message: Mapping[str, Any], i: int, hold: Any) -> dict[str, Any]:
    """The message as the template sees it: its texts replaced by markers, images as bare parts."""
    content = message.get("content", "")
    if isinstance(content, str):
        return {"role": message["role"], "content": hold(content, f"messages[{i}].content")}
    parts = []
    for j, part in enumerate(content_parts(message, i)):
        if part["type"] == "text":
            parts.append({"type": "text", "text": hold(part["text"], f"messages[{i}].content[{j}].text")})
        else:
            parts.append({"type": "image"})
    return {"role": message["role"], "content": parts}


class _TemplateRaisedError(Exception):
    pass


def _raise(message: Any) -> None:
    raise _TemplateRaisedError(str(message)[:500])


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: Any = None,
    separators: Any = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


def _capped(chunks: Iterator[str]) -> str:
    out, size = [], 0
    for chunk in chunks:
        size += len(chunk)
        if size > MAX_RENDERED_CHARS:
            raise ConfigError(f"the chat template rendered more than {MAX_RENDERED_CHARS} characters")
        out.append(chunk)
    return "".join(out)
