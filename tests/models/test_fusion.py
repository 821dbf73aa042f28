"""The shared fusion encoder: which layers cross-attend, and what its text mode runs (BLIP / ALBEF)."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from mmedge.errors import ConfigError
from mmedge.models.fusion import FusionConfig, FusionEncoder

CFG = {"vocab_size": 20, "hidden": 16, "layers": 4, "heads": 2, "intermediate": 32, "encoder_hidden": 8}


def _inputs() -> tuple:
    torch.manual_seed(0)
    ids = torch.randint(0, 20, (2, 5))
    mask = torch.tensor([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]])
    return ids, mask, torch.randn(2, 7, 8)


def test_blip_style_every_layer_fuses_and_text_mode_skips_cross_attention() -> None:
    enc = FusionEncoder(FusionConfig(**CFG, fusion_from=0)).eval()
    assert all(hasattr(layer, "crossattention") for layer in enc.encoder.layer)
    ids, mask, image = _inputs()
    with torch.no_grad():
        text, fused = enc.text(ids, mask), enc.fuse(ids, mask, image)
        x = enc.embeddings(ids)
        bias = (mask[:, None, None, :] == 0).float() * -3.0e4
        for layer in enc.encoder.layer:
            x = layer(x, bias, None)
    torch.testing.assert_close(text, x)
    assert not torch.allclose(text, fused)


def test_albef_style_lower_layers_are_text_only() -> None:
    enc = FusionEncoder(FusionConfig(**CFG, fusion_from=2)).eval()
    assert [hasattr(layer, "crossattention") for layer in enc.encoder.layer] == [False, False, True, True]
    ids, mask, image = _inputs()
    with torch.no_grad():
        text, fused = enc.text(ids, mask), enc.fuse(ids, mask, image)
        bias = (mask[:, None, None, :] == 0).float() * -3.0e4
        x = text  # the fusion layers continue from the text encoder's output, as ALBEF runs them
        for layer in enc.encoder.layer[2:]:
            x = layer(x, bias, image)
    torch.testing.assert_close(fused, x)
    # padded keys do not matter: the unpadded rows of a shorter text agree
    with torch.no_grad():
        short = enc.fuse(ids[1:, :3], mask[1:, :3], image[1:])
    torch.testing.assert_close(short[0], fused[1, :3], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fusion_from", [-1, 4])
def test_fusion_from_must_name_a_layer(fusion_from: int) -> None:
    with pytest.raises(ConfigError, match="fusion_from"):
        FusionConfig(**CFG, fusion_from=fusion_from)


def test_token_type_embeddings_add_type_zero_where_configured() -> None:
    plain = FusionEncoder(FusionConfig(**CFG, fusion_from=2)).eval()
    assert not hasattr(plain.embeddings, "token_type_embeddings")  # BLIP: none
    typed = FusionEncoder(FusionConfig(**CFG, fusion_from=2, type_vocab_size=2)).eval()
    typed.load_state_dict(plain.state_dict(), strict=False)
    ids, _, _ = _inputs()
    emb = typed.embeddings
    with torch.no_grad():
        expected = emb.LayerNorm(
            emb.word_embeddings(ids)
            + emb.position_embeddings.weight[:5]
            + emb.token_type_embeddings.weight[0]
        )
        torch.testing.assert_close(emb(ids), expected)
    with pytest.raises(ConfigError, match="type_vocab_size"):
        FusionConfig(**CFG, type_vocab_size=-1)
