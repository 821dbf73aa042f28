"""Chat templates: rendered in a sandbox, user text kept out of the template's reach, images counted."""

from __future__ import annotations

import pytest

from mmedge.errors import ConfigError, InvalidInputError
from mmedge.runtime.chat_template import TemplateChat
from mmedge.runtime.sections import ChatTemplate
from mmedge.runtime.texts import TextTokenizer

LLAVA = (
    "{% for m in messages %}{{ m['role'].upper() + ': ' }}"
    "{% for p in m['content'] if p['type'] == 'image' %}{{ '<image>\n' }}{% endfor %}"
    "{% for p in m['content'] if p['type'] == 'text' %}{{ p['text'] + ' ' }}{% endfor %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)


def _tokenizer() -> TextTokenizer:
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    words = [
        "<unk>",
        "<s>",
        "</s>",
        "USER",
        "ASSISTANT",
        ":",
        "what",
        "is",
        "this",
        "<",
        ">",
        "image",
        "[INST]",
    ]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<image>", special=True), AddedToken("</s>", special=True)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return TextTokenizer(tok, context_length=64, pad_id=0)


def _chat(template: str = LLAVA) -> TemplateChat:
    return TemplateChat(ChatTemplate(template, "<image>", "<s>", "</s>"), _tokenizer())


def _user(text: str, images: int = 1) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image"}] * images + [{"type": "text", "text": text}]}]


def test_images_become_slots_and_specials_come_from_the_template_only() -> None:
    chat = _chat()
    image = chat.image_id
    items = chat.encode(_user("what is this", images=2), images=2)
    assert items[0] == 1 and items.count(None) == 2 and image not in items  # BOS from the post-processor
    # a user who types the placeholder or a special token gets plain text, not an image or </s>
    typed = chat.encode(_user("<image> what </s> is this"), images=1)
    assert typed.count(None) == 1
    assert 2 not in typed  # "</s>" typed by the user is not the EOS token
    words = chat.tokenizer.encode("<image> what </s> is this", add_special_tokens=False)
    assert words[:3] == [9, 11, 10]  # "<", "image", ">": plain words
    assert any(typed[i : i + len(words)] == words for i in range(len(typed)))


def test_the_count_of_images_must_match_the_placeholders() -> None:
    with pytest.raises(InvalidInputError, match=r"carries 1 image.*places 2"):
        _chat(LLAVA.replace("'<image>\n'", "'<image><image>'")).encode(_user("what"), images=1)
    with pytest.raises(InvalidInputError, match=r"carries 2 image.*places 1"):
        _chat().encode(_user("what"), images=2)  # two images given, one image part


def test_bad_templates_and_conversations_are_typed_errors() -> None:
    with pytest.raises(ConfigError, match="malformed"):
        _chat("{% for m in messages %}{{ m['role'] }")
    escape = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ConfigError, match="sandbox"):
        _chat(escape).encode(_user("what"), images=1)
    with pytest.raises(ConfigError, match="sandbox"):
        _chat("{{ messages.append(1) }}").encode(_user("what"), images=1)  # inputs are immutable
    with pytest.raises(ConfigError, match="more than"):
        _chat("{% for i in range(99999) %}{{ 'x' * 100 }}{% endfor %}").encode(_user("what"), images=1)
    refusing = "{{ raise_exception('only user turns') }}"
    with pytest.raises(InvalidInputError, match="refused the conversation: only user turns"):
        _chat(refusing).encode(_user("what"), images=0)
    with pytest.raises(ConfigError, match="not a token"):
        TemplateChat(ChatTemplate(LLAVA, "<img>"), _tokenizer())
    chat = _chat()
    for messages, match in (
        ([{"role": "robot", "content": "hi"}], "role 'robot'"),
        ([{"role": "user", "content": "hi", "name": "x"}], "'role' and 'content' only"),
        ([], "empty"),
        ("hello", "list of"),
        ([{"role": "user", "content": [{"type": "video"}]}], "content\\[0\\]"),
        ([{"role": "user", "content": [{"type": "text", "text": 5}]}], "text must be a string"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            chat.encode(messages, images=0)


def test_template_helpers_work_as_in_transformers() -> None:
    template = (
        "{% for m in messages %}{% generation %}{{ m['content'] | tojson }}{% endgeneration %}"
        "{% if loop.index > 0 %}{% break %}{% endif %}{% endfor %}{{ bos_token }}"
    )
    pieces = _chat(template).render([{"role": "user", "content": "what"}, {"role": "user", "content": "x"}])
    # the user text comes back verbatim between the template's quotes; the loop broke after one message
    assert pieces == [('"', False), ("what", True), ('"<s>', False)]
