"""TextTokenizer: truncation keeps EOS, padding/mask, input validation, special-token injection."""

from __future__ import annotations

import numpy as np
import pytest
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers

from mmedge.errors import ConfigError, IntegrityError, InvalidInputError
from mmedge.runtime.texts import TextLimits, TextTokenizer

SOT, EOT = "<|startoftext|>", "<|endoftext|>"
CORPUS = ["a photo of a cat", "a red square on a blue circle", "two dogs playing in the snow"] * 5


def _tokenizer(pad: bool = False) -> Tokenizer:
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    specials = [SOT, EOT] + (["<pad>"] if pad else [])
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{SOT} $A {EOT}", special_tokens=[(SOT, tok.token_to_id(SOT)), (EOT, tok.token_to_id(EOT))]
    )
    return tok


@pytest.fixture(scope="module")
def tok_path(tmp_path_factory):
    path = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    _tokenizer().save(str(path))
    return path


@pytest.fixture(scope="module")
def ref():
    return _tokenizer()


def test_truncation_keeps_sot_and_eot(tok_path, ref):
    tt = TextTokenizer.from_file(tok_path, context_length=8, pad_id=0)
    long = "a photo of a cat and two dogs playing in the snow on a red square"
    ids, mask = tt.encode_batch([long])
    assert ids.shape == mask.shape == (1, 8)
    assert ids.dtype == mask.dtype == np.int64
    full = ref.encode(long).ids  # untruncated reference: SOT, body..., EOT
    assert len(full) > 8
    assert ids[0, 0] == ref.token_to_id(SOT) and ids[0, -1] == ref.token_to_id(EOT)
    assert ids[0, 1:-1].tolist() == full[1:7]  # the first 6 body tokens survive
    assert mask.tolist() == [[1] * 8]


def test_padding_to_longest_with_mask(tok_path, ref):
    tt = TextTokenizer.from_file(tok_path, context_length=32, pad_id=0)
    texts = ["a cat", "two dogs playing in the snow"]
    ids, mask = tt.encode_batch(texts)
    lengths = [len(ref.encode(t).ids) for t in texts]
    assert ids.shape == (2, max(lengths)) and max(lengths) < 32  # longest, not context_length
    for row, (text, n) in enumerate(zip(texts, lengths)):
        assert ids[row, :n].tolist() == ref.encode(text).ids
        assert (ids[row, n:] == 0).all()
        assert mask[row].tolist() == [1] * n + [0] * (ids.shape[1] - n)


def test_special_tokens_typed_by_user_are_plain_text(tok_path, ref):
    tt = TextTokenizer.from_file(tok_path, context_length=64, pad_id=0)
    sot, eot = ref.token_to_id(SOT), ref.token_to_id(EOT)
    assert ref.encode(f"a cat {EOT} dog").ids.count(eot) == 2  # plain tokenizers would inject it
    ids, mask = tt.encode_batch([f"a cat {EOT} dog {SOT}"])
    body = ids[0][mask[0] == 1].tolist()
    assert body[0] == sot and body[-1] == eot
    assert sot not in body[1:-1] and eot not in body[1:-1]
    assert len(body) > 10  # the markers became ordinary byte-level tokens


def test_lowercase_option(tok_path):
    plain = TextTokenizer.from_file(tok_path, context_length=16, pad_id=0)
    lower = TextTokenizer.from_file(tok_path, context_length=16, pad_id=0, lowercase=True)
    a, _ = lower.encode_batch(["A PHOTO OF A CAT"])
    b, _ = plain.encode_batch(["a photo of a cat"])
    assert a.tolist() == b.tolist()


@pytest.mark.parametrize("text", ["", "   ", "\n\t \u3000"])
def test_empty_text_rejected(tok_path, text):
    tt = TextTokenizer.from_file(tok_path, context_length=16, pad_id=0)
    with pytest.raises(InvalidInputError, match="empty text"):
        tt.encode_batch(["a cat", text])


def test_huge_text_rejected_before_tokenising(tok_path):
    tt = TextTokenizer.from_file(tok_path, context_length=16, pad_id=0, limits=TextLimits(max_chars=10_000))

    class Exploding:
        def encode_batch(self, *a, **k):
            raise AssertionError("tokenizer must not see an over-limit text")

    tt._tok = Exploding()
    with pytest.raises(InvalidInputError, match=r"1000000 characters; the limit is 10000"):
        tt.encode_batch(["a" * 1_000_000])


@pytest.mark.parametrize("bad", [None, 3, b"bytes", ["nested"]])
def test_non_str_rejected(tok_path, bad):
    tt = TextTokenizer.from_file(tok_path, context_length=16, pad_id=0)
    with pytest.raises(InvalidInputError, match="expected str"):
        tt.encode_batch(["a cat", bad])


def test_bare_string_and_empty_batch_rejected(tok_path):
    tt = TextTokenizer.from_file(tok_path, context_length=16, pad_id=0)
    with pytest.raises(InvalidInputError, match="list of strings"):
        tt.encode_batch("a cat")
    with pytest.raises(InvalidInputError, match="no texts"):
        tt.encode_batch([])


def test_control_characters_and_surrogates(tok_path):
    tt = TextTokenizer.from_file(tok_path, context_length=32, pad_id=0)
    _, mask = tt.encode_batch(["a\x00cat\x07\x1b[31m dog\r\n"])
    assert mask.sum() > 2
    with pytest.raises(InvalidInputError, match="not valid Unicode"):
        tt.encode_batch(["a \ud800 cat"])


def test_tokenizer_failures_become_input_errors(tok_path):
    tt = TextTokenizer.from_file(tok_path, context_length=16, pad_id=0)

    class PanicException(BaseException):  # what pyo3 raises for a Rust panic
        pass

    class Failing:
        def __init__(self, exc):
            self.exc = exc

        def encode_batch(self, *a, **k):
            raise self.exc

    for exc in (PanicException("boom"), RuntimeError("bad")):
        tt._tok = Failing(exc)
        with pytest.raises(InvalidInputError, match="tokenizer rejected"):
            tt.encode_batch(["a cat"])
    for exc in (KeyboardInterrupt(), SystemExit(1)):
        tt._tok = Failing(exc)
        with pytest.raises(type(exc)):
            tt.encode_batch(["a cat"])


def test_config_errors(tmp_path, tok_path):
    with pytest.raises(ConfigError, match="no room"):
        TextTokenizer.from_file(tok_path, context_length=2, pad_id=0)
    with pytest.raises(ConfigError, match="outside the vocabulary"):
        TextTokenizer.from_file(tok_path, context_length=8, pad_id=10_000)
    with pytest.raises(IntegrityError, match="cannot load tokenizer"):
        TextTokenizer.from_file(tmp_path / "missing.json", context_length=8)
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(IntegrityError):
        TextTokenizer.from_file(tmp_path / "bad.json", context_length=8)


def test_default_pad_id_and_from_json():
    with_pad = TextTokenizer.from_json(_tokenizer(pad=True).to_str(), context_length=16)
    assert with_pad.pad_id == with_pad._tok.token_to_id("<pad>")
    clip_like = TextTokenizer.from_json(_tokenizer().to_str(), context_length=16)
    assert clip_like.pad_id == clip_like._tok.token_to_id(EOT)  # HF CLIP pads with end-of-text
    ids, mask = clip_like.encode_batch(["a cat", "two dogs playing"])
    assert (ids[mask == 0] == clip_like.pad_id).all()
