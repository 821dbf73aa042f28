"""Tiny random Hugging Face directories written with transformers' own `save_pretrained`, for tests
that need a real HF layout (weights, config, tokenizer, image processor) without a model hub."""

from __future__ import annotations

from pathlib import Path

import transformers
from tokenizers import Tokenizer


def write_tiny_hf_clip(
    root: Path, image_mean: list[float] | None = None, image_std: list[float] | None = None
) -> None:
    """A 1-layer CLIPModel at 32 px with the tiny synthetic-scene tokenizer (ids: pad 0, bos 1, eos 3)."""
    from mmedge.models.init import tiny_tokenizer_json

    tok = tiny_tokenizer_json(generative=False)
    cfg = transformers.CLIPConfig(
        text_config={
            "vocab_size": Tokenizer.from_str(tok).get_vocab_size(),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
            "max_position_embeddings": 32,
            "eos_token_id": 3,
            "pad_token_id": 0,
            "bos_token_id": 1,
        },
        vision_config={
            "image_size": 32,
            "patch_size": 8,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 2,
        },
        projection_dim=16,
    )
    transformers.CLIPModel(cfg).save_pretrained(root)
    (root / "tokenizer.json").write_text(tok)
    extra = {} if image_mean is None else {"image_mean": image_mean, "image_std": image_std}
    processor = transformers.CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, **extra
    )
    processor.save_pretrained(root)


def word_tokenizer_json(vocab_size: int) -> str:
    """A word-level tokenizer over "t0".."t{n}" with <pad>, <s>, </s> as the last three ids."""
    from tokenizers import models, pre_tokenizers

    n = vocab_size
    vocab = {f"t{i}": i for i in range(n - 3)} | {"<pad>": n - 3, "<s>": n - 2, "</s>": n - 1}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<pad>", "<s>", "</s>"])
    return tok.to_str()
