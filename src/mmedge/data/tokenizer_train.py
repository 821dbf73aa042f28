"""Train a small BPE tokenizer (HF `tokenizers`) for the tiny models, CLIP-style specials."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Order fixes the ids: pad=0, bos=1, unk=2, eos=3 (eos != 2 so pooling uses the first eos, not argmax).
SPECIALS = ("<pad>", "<|startoftext|>", "<unk>", "<|endoftext|>")
PAD_ID, BOS_ID, UNK_ID, EOS_ID = range(4)


def train_tokenizer(texts: Iterable[str], vocab_size: int = 256, generation: bool = False) -> Tokenizer:
    """A lowercasing BPE tokenizer with `<|startoftext|> $A <|endoftext|>` post-processing.

    `generation=True` makes a decoder LM's tokenizer instead: spaces survive decoding (Metaspace)
    and only `<|startoftext|>` is added, so a prompt does not end in EOS.
    """
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()])
    if generation:
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
    else:
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        tok.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A" if generation else "<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", BOS_ID), ("<|endoftext|>", EOS_ID)],
    )
    return tok
