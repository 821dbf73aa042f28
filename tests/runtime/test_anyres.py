"""Anyres images against transformers: pixels (LlavaNextImageProcessorPil), token counts
(LlavaNextProcessor) and feature packing (LlavaNextModel) of a tiny random LLaVA-NeXT."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models
from transformers import (
    CLIPVisionConfig,
    LlamaConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    PreTrainedTokenizerFast,
)
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

from mmedge.errors import ConfigError, InvalidInputError
from mmedge.runtime.anyres import (
    MAX_GRID_SIDE,
    MAX_PINPOINTS,
    AnyResConfig,
    num_image_tokens,
    pack_features,
    preprocess_anyres,
    select_best_resolution,
)

TILE, PATCH, DIM = 32, 8, 24
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
CFG = AnyResConfig(grid_pinpoints=PINPOINTS, tile_size=TILE, patch_size=PATCH)
# (height, width): tall, wide, square, tiny, very elongated both ways, large, odd, upscaled; and a
# strip so thin that every pinpoint keeps 0 of its rows (the least wasteful one wins, and the
# unpadded tile grid has no rows left).
SIZES = [
    (90, 30),
    (30, 100),
    (50, 50),
    (1, 1),
    (3, 2),
    (4, 300),
    (300, 5),
    (200, 130),
    (33, 65),
    (7, 200),
    (2, 300),
]


def image(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth gradients plus noise: edges and flat areas both reach the resampler."""
    rng = np.random.default_rng(seed + 7 * height + width)
    yy, xx = np.mgrid[0:height, 0:width]
    base = np.stack([255 * yy / max(height, 1), 255 * xx / max(width, 1), 128 + 0 * yy], axis=-1)
    return np.clip(base + rng.normal(0, 40, base.shape), 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def hf_images() -> LlavaNextImageProcessorPil:
    return LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=PINPOINTS,
        image_mean=list(CFG.mean),
        image_std=list(CFG.std),
    )


def hf_processor(hf_images, strategy: str, cls_tokens: int) -> LlavaNextProcessor:
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "<image>": 1, "a": 2}, unk_token="<unk>"))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>")
    tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
    return LlavaNextProcessor(
        image_processor=hf_images,
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=cls_tokens,
    )


@pytest.fixture(scope="module")
def tiny_llava() -> LlavaNextForConditionalGeneration:
    torch.manual_seed(0)
    vision = CLIPVisionConfig(
        image_size=TILE, patch_size=PATCH, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2,
    )  # fmt: skip
    text = LlamaConfig(
        vocab_size=64, hidden_size=DIM, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
        num_key_value_heads=2,
    )  # fmt: skip
    config = LlavaNextConfig(
        vision_config=vision, text_config=text, image_grid_pinpoints=PINPOINTS, image_token_index=63,
        vision_feature_layer=-2, vision_feature_select_strategy="default",
    )  # fmt: skip
    return LlavaNextForConditionalGeneration(config).eval()


def test_sizes_select_several_grids():
    grids = {select_best_resolution(hw, CFG.grid_pinpoints) for hw in SIZES}
    assert len(grids) >= 3
    for hw in SIZES:
        assert select_best_resolution(hw, CFG.grid_pinpoints) == hf_select_best_resolution(hw, PINPOINTS)


@pytest.mark.parametrize("hw", SIZES)
def test_pixels_match_transformers(hf_images, hw):
    img = image(*hw)
    ref = hf_images(images=[img], return_tensors="np", input_data_format="channels_last")["pixel_values"][0]
    ours = preprocess_anyres(img, CFG)
    best_h, best_w = select_best_resolution(hw, CFG.grid_pinpoints)
    assert ours.shape == ref.shape == (1 + (best_h // TILE) * (best_w // TILE), 3, TILE, TILE)
    assert ours.dtype == np.float32
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-5)


def test_padding_is_black_and_centred():
    # A 39x32 (HxW) white image goes to the 64x32 pinpoint unresized: 25 rows of padding, 12 above
    # and 13 below (the odd row goes after the image), black before normalisation.
    views = preprocess_anyres(np.full((39, 32, 3), 255, np.uint8), CFG)
    assert views.shape == (3, 3, TILE, TILE)
    black = (0.0 - np.asarray(CFG.mean, np.float32)) / np.asarray(CFG.std, np.float32)
    white = (1.0 - np.asarray(CFG.mean, np.float32)) / np.asarray(CFG.std, np.float32)
    column = np.concatenate(
        [np.repeat(black[None], 12, 0), np.repeat(white[None], 39, 0), np.repeat(black[None], 13, 0)]
    )
    tiles = np.concatenate([views[1], views[2]], axis=1)  # (3, 64, 32)
    np.testing.assert_allclose(tiles, np.broadcast_to(column.T[:, :, None], (3, 64, TILE)), atol=1e-6)


@pytest.mark.parametrize(("strategy", "cls_tokens"), [("default", 1), ("full", 0), ("full", 1)])
def test_token_counts_match_processor(hf_images, strategy, cls_tokens):
    processor = hf_processor(hf_images, strategy, cls_tokens)
    image_id = processor.tokenizer.convert_tokens_to_ids("<image>")
    for hw in SIZES:
        kwargs = {"return_tensors": "np", "input_data_format": "channels_last"}
        ids = processor(images=[image(*hw)], text="<image> a", **kwargs)["input_ids"][0]
        counted = num_image_tokens(hw, CFG, strategy=strategy, cls_tokens=cls_tokens)
        assert counted == int((ids == image_id).sum()), hw


def test_full_strategy_counts_the_cls_token_in_the_base_view():
    hw = (50, 50)
    default = num_image_tokens(hw, CFG)
    assert num_image_tokens(hw, CFG, strategy="full", cls_tokens=0) == default
    assert num_image_tokens(hw, CFG, strategy="full", cls_tokens=1) == default + 1


@pytest.mark.parametrize("hw", SIZES)
def test_packing_matches_transformers(tiny_llava, hw):
    best_h, best_w = select_best_resolution(hw, CFG.grid_pinpoints)
    views = 1 + (best_h // TILE) * (best_w // TILE)
    rng = np.random.default_rng(hw[0] * 1000 + hw[1])
    features = rng.standard_normal((views, CFG.tokens_per_side**2, DIM)).astype(np.float32)
    newline = rng.standard_normal(DIM).astype(np.float32)
    ref, lens = tiny_llava.model.pack_image_features(
        [torch.from_numpy(features)], torch.tensor([hw]), "default", image_newline=torch.from_numpy(newline)
    )
    ours = pack_features(features, hw, CFG, newline)
    assert ours.shape == tuple(ref[0].shape) and int(lens[0]) == num_image_tokens(hw, CFG)
    np.testing.assert_allclose(ours, ref[0].numpy(), rtol=0, atol=1e-6)


@pytest.mark.parametrize("hw", [(90, 30), (30, 100), (200, 130)])
def test_image_features_end_to_end(tiny_llava, hw):
    """Our pixels through the model's own tower and projector, packed by us == get_image_features."""
    pixels = torch.from_numpy(preprocess_anyres(image(*hw), CFG))
    model = tiny_llava.model
    with torch.no_grad():
        ref = model.get_image_features(pixel_values=pixels[None], image_sizes=torch.tensor([hw]))
        hidden = model.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # CLS dropped
        projected = model.multi_modal_projector(hidden).numpy()
    ours = pack_features(projected, hw, CFG, model.image_newline.detach().numpy())
    np.testing.assert_allclose(ours, ref.pooler_output[0].numpy(), rtol=0, atol=1e-5)


def test_kept_cls_tokens_cannot_be_packed(tiny_llava):
    # transformers counts them ("full" with num_additional_image_tokens=1) but cannot pack the tiles.
    hw = (50, 50)
    features = np.zeros((5, CFG.tokens_per_side**2 + 1, DIM), np.float32)
    newline = np.zeros(DIM, np.float32)
    with pytest.raises(RuntimeError):
        tiny_llava.model.pack_image_features(
            [torch.from_numpy(features)], torch.tensor([hw]), "full", image_newline=torch.from_numpy(newline)
        )
    with pytest.raises(InvalidInputError, match="CLS"):
        pack_features(features, hw, CFG, newline)


def test_pack_rejects_wrong_shapes():
    features = np.zeros((5, 16, DIM), np.float32)
    newline = np.zeros(DIM, np.float32)
    with pytest.raises(InvalidInputError, match="1 \\+ 4"):
        pack_features(features[:3], (50, 50), CFG, newline)
    with pytest.raises(InvalidInputError, match="image_newline"):
        pack_features(features, (50, 50), CFG, newline[:-1])
    with pytest.raises(InvalidInputError, match="feature tokens"):
        pack_features(np.zeros((5, 9, DIM), np.float32), (50, 50), CFG, newline)


def test_config_round_trip():
    data = CFG.to_dict()
    assert data["grid_pinpoints"] == PINPOINTS and data["tile_size"] == TILE
    again = AnyResConfig.from_dict(json.loads(json.dumps(data)))
    assert again == CFG and again.grid_pinpoints == tuple(map(tuple, PINPOINTS))
    with pytest.raises(ConfigError, match="unknown keys"):
        AnyResConfig.from_dict({**data, "resample": "cv2"})
    with pytest.raises(ConfigError, match="missing keys"):
        AnyResConfig.from_dict({k: v for k, v in data.items() if k != "tile_size"})
    with pytest.raises(ConfigError):
        AnyResConfig.from_dict({**data, "grid_pinpoints": [[32, "64"]]})


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"grid_pinpoints": []}, "non-empty"),
        ({"grid_pinpoints": [[32, 48]]}, "multiple of tile_size"),
        ({"grid_pinpoints": [[30, 60]]}, "multiple of tile_size"),
        ({"grid_pinpoints": [[32, 32 * (MAX_GRID_SIDE + 1)]]}, "tiles a side"),
        ({"grid_pinpoints": [[32, 64]] * (MAX_PINPOINTS + 1)}, "limit"),
        ({"grid_pinpoints": [[32, 64, 96]]}, "pair"),
        ({"grid_pinpoints": [[0, 32]]}, "pair"),
        ({"grid_pinpoints": [[True, 32]]}, "pair"),
        ({"tile_size": 0}, "tile_size"),
        ({"tile_size": 36}, "multiple of patch_size"),
        ({"patch_size": 0}, "patch_size"),
        ({"std": (0.5, 0.0, 0.5)}, "std"),
        ({"rescale": float("nan")}, "rescale"),
    ],
)
def test_config_rejects(changes, match):
    fields = {"grid_pinpoints": PINPOINTS, "tile_size": TILE, "patch_size": PATCH, **changes}
    with pytest.raises(ConfigError, match=match):
        AnyResConfig(**fields)


def test_huge_tiles_rejected_by_area():
    with pytest.raises(ConfigError, match="pixels"):
        AnyResConfig(grid_pinpoints=[[4096 * 8, 4096 * 8]], tile_size=4096, patch_size=16)


@pytest.mark.parametrize(
    "bad",
    [
        np.zeros((0, 5, 3), np.uint8),
        np.zeros((5, 0, 3), np.uint8),
        np.zeros((5, 5), np.uint8),
        np.zeros((5, 5, 4), np.uint8),
        np.zeros((5, 5, 3), np.float32),
        [[[0, 0, 0]]],
    ],
)
def test_bad_images_rejected(bad):
    with pytest.raises(InvalidInputError):
        preprocess_anyres(bad, CFG)


@pytest.mark.parametrize("hw", [(0, 5), (5, 0), (-1, 3), (5,), (2.0, 3), 5, "ab"])
def test_bad_sizes_rejected(hw):
    with pytest.raises(InvalidInputError):
        num_image_tokens(hw, CFG)
    with pytest.raises(InvalidInputError):
        select_best_resolution(hw, CFG.grid_pinpoints)


def test_empty_pinpoints_rejected_by_selection():
    with pytest.raises(ConfigError, match="empty"):
        select_best_resolution((5, 5), [])


def test_bad_strategy_rejected():
    with pytest.raises(ConfigError, match="strategy"):
        num_image_tokens((50, 50), CFG, strategy="cls")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="cls_tokens"):
        num_image_tokens((50, 50), CFG, cls_tokens=-1)
