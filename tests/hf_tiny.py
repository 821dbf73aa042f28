"""Tiny random Hugging Face directories written with transformers' own `save_pretrained`, for tests
that need a real HF layout (weights, config, tokenizer, image processor) without a model hub."""

from __future__ import annotations

from pathlib import Path
from typing import Any

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


# LLaVA: a word-level tokenizer with the <image> placeholder and a BOS post-processor, a
# LLaVA-1.5-style chat template (with a system turn), and conversations in HF's and mmedge's forms.
LLAVA_WORDS = ["what", "is", "the", "colour", "shape", "of", "this", "and", "that", "circle", "red", "?", "."]
# A LLaVA-1.5-style template (the llava-hf processors' structure, with a system turn).
LLAVA_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'][0]['text'] + ' ' }}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% if message['role'] == 'assistant' %}{% generation %}{{ content['text'] + ' ' }}{% endgeneration %}"
    "{% else %}{{ content['text'] + ' ' }}{% endif %}{% endfor %}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def llava_tokenizer(vocab_size: int):
    from tokenizers import AddedToken, Tokenizer, models, pre_tokenizers, processors

    words = ["<unk>", "<s>", "</s>", "<pad>", "USER", "ASSISTANT", ":", *LLAVA_WORDS]
    words += [f"w{i}" for i in range(vocab_size - len(words) - 1)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens([AddedToken("<image>", special=True, normalized=False)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    assert tok.get_vocab_size() == vocab_size
    return tok


def llava_conversation(images, turns):
    """(HF conversation, our messages) for user turns [(n_images, text)] and answers between them."""
    hf_conv, ours, k = [], [], 0
    for role, content in turns:
        if role == "user":
            n, text = content
            hf_conv.append(
                {"role": "user", "content": [{"type": "image"}] * n + [{"type": "text", "text": text}]}
            )
            parts = [{"type": "image", "image": str(p)} for p in images[k : k + n]]
            ours.append({"role": "user", "content": [*parts, {"type": "text", "text": text}]})
            k += n
        else:
            hf_conv.append({"role": role, "content": [{"type": "text", "text": content}]})
            ours.append({"role": role, "content": [{"type": "text", "text": content}]})
    return hf_conv, ours, images[:k]


def tiny_causal_lm(style: str, vocab: int, context: int, eos: int) -> Any:
    """A random OPT or Llama causal LM (2 layers, width 64; Llama with grouped-query attention and
    tied embeddings), seeded; pad / bos are the last ids but eos."""
    import torch
    import transformers

    torch.manual_seed(0)
    ids = {"pad_token_id": vocab - 3, "bos_token_id": vocab - 2, "eos_token_id": eos}
    if style == "opt":
        cfg = transformers.OPTConfig(
            vocab_size=vocab,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=context,
            word_embed_proj_dim=64,
            init_std=0.3,
            **ids,
        )
        return transformers.OPTForCausalLM(cfg).eval()
    cfg = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        num_hidden_layers=2,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=context,
        tie_word_embeddings=True,
        initializer_range=0.3,
        rms_norm_eps=1e-5,
        rope_theta=500.0,
        **ids,
    )
    return transformers.LlamaForCausalLM(cfg).eval()


def write_tiny_hf_blip2(root: Path, vocab: int, queries: int, size: int, qformer_layers: int) -> Any:
    """A seeded random Blip2ForConditionalGeneration (ViT width 32 at `size` px, patch 8; a Q-Former
    with `queries` queries; a 2-layer OPT of width 48) saved with its image processor and a word-level
    tokenizer ("t0".."t{vocab-1}") into `root`; returns the model. The image path is scaled up so the
    image matters to the LM (HF's init leaves it tiny)."""
    import torch
    from tokenizers import models, pre_tokenizers

    torch.manual_seed(0)
    layer = {"hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4, "initializer_range": 0.2}
    cfg = transformers.Blip2Config(
        vision_config={
            **layer,
            "num_hidden_layers": 2,
            "image_size": size,
            "patch_size": 8,
            "qkv_bias": True,
        },
        qformer_config={
            **layer,
            "num_hidden_layers": qformer_layers,
            "cross_attention_frequency": 2,
            "vocab_size": 100,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": vocab,
            "hidden_size": 48,
            "num_hidden_layers": 2,
            "ffn_dim": 96,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": 48,
            "init_std": 0.3,
            "bos_token_id": 2,
            "eos_token_id": 1,
        },
        num_query_tokens=queries,
        image_token_index=vocab - 1,
    )
    hf = transformers.Blip2ForConditionalGeneration(cfg).eval()
    with torch.no_grad():
        hf.query_tokens.normal_(0, 1.0)
        hf.language_projection.weight.normal_(0, 0.5)
    hf.save_pretrained(root)
    transformers.BlipImageProcessor(size={"height": size, "width": size}).save_pretrained(root)
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tokenizer.json"))
    return hf


def tiny_blip_config(size: int, text: dict[str, Any], **top: Any) -> Any:
    """A small random BLIP config: a 2-layer ViT of width 32 at `size` px (patch 8) and a 2-layer
    BERT of width 32 (context 40), `text` adding its vocabulary and special ids."""
    layers = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    return transformers.BlipConfig(
        vision_config={**layers, "image_size": size, "patch_size": 8, "initializer_range": 0.2},
        text_config={
            **layers,
            "max_position_embeddings": 40,
            "sep_token_id": 3,
            "initializer_range": 0.2,
            **text,
        },
        initializer_range=0.2,
        **top,
    )


def save_blip_model(root: Path, hf: Any, tokenizer: Any, size: int) -> Any:
    """`save_pretrained` a BLIP model with its BlipProcessor (PIL image processor at `size`, the
    given HF tokenizer) into `root`; returns the processor."""
    from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil

    hf.save_pretrained(root)
    processor = transformers.BlipProcessor(
        image_processor=BlipImageProcessorPil(size={"height": size, "width": size}), tokenizer=tokenizer
    )
    processor.save_pretrained(root)
    return processor
