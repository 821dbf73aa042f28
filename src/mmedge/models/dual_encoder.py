"""The image and text towers of a contrastive dual encoder, declared once for every family that has
them (CLIP, and ImageBind's vision and text): pixels -> `image_embeds`, token ids -> `text_embeds`."""

from __future__ import annotations

from mmedge.models.component import ComponentDecl, bound
from mmedge.runtime.manifest import DimRange, TensorSpec


def image_tower(image_size: int, embed_dim: int, batch: DimRange) -> ComponentDecl:
    """`vision` (image_encoder): (B, 3, S, S) normalised pixels -> (B, D), `encode_image`."""
    s = image_size
    return ComponentDecl(
        name="vision",
        role="image_encoder",
        inputs=(TensorSpec("pixel_values", "float32", ("batch", 3, s, s)),),
        outputs=(TensorSpec("image_embeds", "float32", ("batch", embed_dim)),),
        dims={"batch": batch},
        build=bound("encode_image"),
        calibration_data="images",
    )


def text_tower(vocab_size: int, context: int, embed_dim: int, batch: DimRange) -> ComponentDecl:
    """`text` (text_encoder): (B, N) token ids and mask -> (B, D), `encode_text`."""
    return ComponentDecl(
        name="text",
        role="text_encoder",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "sequence")),
            TensorSpec("attention_mask", "int64", ("batch", "sequence")),
        ),
        outputs=(TensorSpec("text_embeds", "float32", ("batch", embed_dim)),),
        dims={"batch": batch, "sequence": DimRange(1, min(16, context), context)},
        build=bound("encode_text"),
        calibration_data="texts",
        int_ranges={"input_ids": (0, vocab_size), "attention_mask": (1, 2)},
    )
