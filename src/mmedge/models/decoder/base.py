"""The cached-decoder base: one config, the attention over a fixed-size KV cache, and the step.

Variants (`opt.py`, `llama.py` and its subclasses `mistral.py`, `qwen2.py`; later GLM,
visual-expert, T5) subclass `CachedDecoderLM` and say how positions enter (learned embeddings or
rotary), which layer class they stack and how the final hidden state is normalised; `step` and the
exported component contract are shared.

The cached step (`CachedDecoderLM.step`) is what gets exported: the cache is a fixed-size buffer
of `max_context` slots per layer, passed in whole, and the graph returns only the keys/values of
the new tokens. The runtime writes those into its preallocated buffers, so no token ever copies
the whole cache. Attention scores against the cache and against the new tokens are computed apart
and joined before the softmax, so the graph never concatenates (copies) the cache either.

A one-token step is small matrices, so its cost is largely per-node overhead in the runtime: the
forward is written for a short graph (q/k/v and gate/up as one matmul each, 1/sqrt(d) folded into
q's weights, one mask built once for all layers, static slice bounds), and `export.graph_simplify`
removes the exporter's shape arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models.blocks import MASK_VALUE
from mmedge.models.component import ComponentDecl, bound
from mmedge.models.configs import from_dict
from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.sections import LLMConfig


@dataclass(frozen=True)
class DecoderConfig:
    """A decoder LM's sizes and special tokens; `variant` picks the architecture (`decoder.VARIANTS`)."""

    variant: str = "opt"
    vocab_size: int = 50272
    hidden: int = 768
    layers: int = 12
    heads: int = 12
    kv_heads: int = 0  # 0: same as heads
    head_size: int = 0  # 0: hidden // heads; set where HF's head_dim differs (Mistral-Nemo)
    ffn_dim: int = 3072
    max_positions: int = 2048  # learned position table size (opt) / longest supported position
    max_context: int = 256  # KV cache slots in an exported package
    act: str = "relu"
    norm_eps: float = 1e-5
    rope_theta: float = 10000.0  # rotary variants only
    word_embed_proj_dim: int = 0  # opt-350m style project_in/out; 0: same as hidden
    do_layer_norm_before: bool = True
    bias: bool = True
    tie_word_embeddings: bool = True
    bos_token_id: int = 2
    eos_token_id: int = 2
    pad_token_id: int = 1

    def __post_init__(self) -> None:
        from mmedge.models.decoder import VARIANTS

        if self.variant not in VARIANTS:
            raise ConfigError(
                f"decoder variant {self.variant!r} is not supported; choose from {sorted(VARIANTS)}"
            )
        if (not self.head_size and self.hidden % self.heads) or self.heads % self.n_kv_heads:
            raise ConfigError(
                f"hidden {self.hidden}, heads {self.heads}, kv_heads {self.kv_heads} do not divide"
            )
        if self.head_size < 0:
            raise ConfigError(f"head_size {self.head_size} must be 0 (hidden // heads) or positive")
        if not 0 < self.max_context <= self.max_positions:
            raise ConfigError(
                f"max_context {self.max_context} must be in [1, max_positions={self.max_positions}]"
            )

    @property
    def n_kv_heads(self) -> int:
        return self.kv_heads or self.heads

    @property
    def head_dim(self) -> int:
        return self.head_size or self.hidden // self.heads

    @property
    def embed_dim(self) -> int:
        return self.word_embed_proj_dim or self.hidden

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DecoderConfig:
        return from_dict(cls, d, "decoder config")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, half: int) -> torch.Tensor:
    """Rotate halves (HF Llama convention); x (B, H, S, D), cos/sin (B, 1, S, D), `half` = D / 2.

    `half` is a Python int rather than `x.shape[-1] // 2`, so the export has constant slice bounds
    instead of a shape computation per call."""
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


Rope = tuple[torch.Tensor, torch.Tensor] | None
Past = tuple[torch.Tensor, torch.Tensor] | None


class CachedAttention(nn.Module):
    """Self-attention over a fixed-size cache plus the new tokens; `out_name` is the variant's
    name for the output projection (HF: OPT `out_proj`, Llama `o_proj`). q/k/v carry biases when
    `cfg.bias`; so does the output projection unless `out_bias` says otherwise (Qwen2: q/k/v only).

    The checkpoint keeps HF's separate q/k/v projections; the forward joins them into one matmul
    (q's rows pre-scaled by 1/sqrt(d)), which the export folds into a single weight: one GEMV per
    layer and token instead of three, and no scale multiply.
    """

    def __init__(self, cfg: DecoderConfig, out_name: str, out_bias: bool | None = None):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.n_kv_heads, cfg.head_dim
        self.scale = 1.0 / math.sqrt(self.head_dim)
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim  # q may differ from hidden
        self.q_proj = nn.Linear(cfg.hidden, q, bias=cfg.bias)
        self.k_proj = nn.Linear(cfg.hidden, kv, bias=cfg.bias)
        self.v_proj = nn.Linear(cfg.hidden, kv, bias=cfg.bias)
        self.out_name = out_name
        out_bias = cfg.bias if out_bias is None else out_bias
        setattr(self, out_name, nn.Linear(q, cfg.hidden, bias=out_bias))

    def _qkv(self, x: torch.Tensor) -> torch.Tensor:
        weight = torch.cat([self.q_proj.weight * self.scale, self.k_proj.weight, self.v_proj.weight])
        bias = (
            None
            if self.q_proj.bias is None
            else torch.cat([self.q_proj.bias * self.scale, self.k_proj.bias, self.v_proj.bias])
        )
        return F.linear(x, weight, bias)

    def forward(
        self, x: torch.Tensor, past: Past, bias: torch.Tensor, rope: Rope
    ) -> tuple[torch.Tensor, ...]:
        """`bias` (B, 1, g*S, T+S): additive mask over [cache | new] for each grouped query row."""
        out, k, v = packed_attention(self._qkv(x), past, bias, rope, self.heads, self.kv_heads, self.head_dim)
        return getattr(self, self.out_name)(out), k, v


def packed_attention(
    qkv: torch.Tensor, past: Past, bias: torch.Tensor, rope: Rope, h: int, hkv: int, d: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cached self-attention from one packed projection `qkv` (B, S, (H + 2Hkv) * D), q's columns
    pre-scaled by 1/sqrt(D): (output (B, S, H * D), new keys, new values (B, Hkv, S, D)).

    The exported graph of this function is the pattern `builds.ort_decoder` rewrites into
    GroupQueryAttention over an in-place cache; a decoder that computes its self-attention here
    gets that build (and the prefill build) without a matcher of its own."""
    b, s, _ = qkv.shape
    qkv = qkv.view(b, s, h + 2 * hkv, d).transpose(1, 2)  # (B, H + 2Hkv, S, D)
    qk, v = qkv.split([h + hkv, hkv], dim=1)
    if rope is not None:
        qk = rotary(qk, *rope, d // 2)
    q, k = qk.split([h, hkv], dim=1)
    # query heads grouped by the kv head they share (HF repeat_kv order): no copy of k/v per group
    qg = q.reshape(b, hkv, (h // hkv) * s, d)
    scores = qg @ k.transpose(-1, -2)
    if past is not None:
        scores = torch.cat([qg @ past[0].transpose(-1, -2), scores], dim=-1)
    probs = torch.softmax(scores + bias, dim=-1)
    if past is None:
        out = probs @ v
    else:  # split at the cache size, a static dim of the export (not at -s, a dynamic one)
        t = past[0].shape[2]
        out = probs[..., t:] @ v + probs[..., :t] @ past[1]
    return out.view(b, h, s, d).transpose(1, 2).reshape(b, s, h * d), k, v


class CachedDecoderLM(nn.Module):
    """A causal LM with an explicit cache; subclasses keep HF's parameter names for their variant."""

    variant = ""  # its key in `decoder.VARIANTS` and `DecoderConfig.variant`
    rotary: bool = False  # whether the step applies rotary positions (the LLM section's rope_theta)
    hf_model_types: tuple[str, ...] = ()
    hf_embed_weight = ""  # HF name of the token embeddings, for tied LM heads saved once
    # HF config class defaults of (bos, eos, pad), for config.json files that omit them
    hf_token_defaults: tuple[int | None, int | None, int | None] = (None, None, None)

    def __init__(self, cfg: DecoderConfig):
        super().__init__()
        self.cfg = cfg

    def _finish_init(self) -> None:
        """Called by subclasses once their modules exist: the LM head, init, tying."""
        self.lm_head = nn.Linear(self.cfg.embed_dim, self.cfg.vocab_size, bias=False)
        self.apply(_init)
        if self.cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight

    @property
    def embed_tokens(self) -> nn.Embedding:
        raise NotImplementedError

    @property
    def layers(self) -> nn.ModuleList:
        raise NotImplementedError

    def positions(self, x: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, Rope]:
        """Hidden states entering the first layer, and the rotary tables (or None)."""
        raise NotImplementedError

    def final(self, x: torch.Tensor) -> torch.Tensor:
        """The last hidden states before the LM head (final norm, projections)."""
        raise NotImplementedError

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], common: dict[str, Any]) -> dict[str, Any]:
        """HF config.json of this variant -> DecoderConfig fields (`common` holds the shared ones)."""
        raise NotImplementedError

    def step(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        past: list[tuple[torch.Tensor, torch.Tensor]] | None = None,
        logits_to_keep: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """Logits (B, K, V) of the last K positions and each layer's new (key, value), (B, Hkv, S, D).

        `attention_mask` (B, T + S) covers the T cache slots then the S new tokens (1 = attend);
        `past` holds each layer's (key, value) cache, (B, Hkv, T, D), or None for no cache;
        `logits_to_keep` (1,) is K (HF's name; default all S): a prefill needs only the last
        position's logits, and the vocabulary projection is the costliest matmul of a small LM.
        """
        cfg = self.cfg
        s = inputs_embeds.shape[1]
        t = attention_mask.shape[1] - s
        mask = attention_mask.to(inputs_embeds.dtype)
        causal = torch.triu(torch.full((s, s), MASK_VALUE, dtype=inputs_embeds.dtype), diagonal=1)
        bias = causal + (1.0 - mask[:, None, None, t:]) * MASK_VALUE  # (B, 1, S, S)
        if past is not None:
            past_bias = (1.0 - mask[:, None, None, :t]) * MASK_VALUE  # (B, 1, 1, T)
            bias = torch.cat([past_bias.expand(-1, -1, s, -1), bias], dim=-1)
        bias = bias.repeat(1, 1, cfg.heads // cfg.n_kv_heads, 1)  # rows of the grouped queries
        x, rope = self.positions(inputs_embeds, position_ids)
        new_kv = []
        for i, layer in enumerate(self.layers):
            x, k, v = layer(x, past[i] if past is not None else None, bias, rope)
            new_kv.append((k, v))
        if logits_to_keep is not None:
            x = x[:, s - logits_to_keep[0] :]
        return self.lm_head(self.final(x)), new_kv

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Logits for whole sequences without a cache (training, reference)."""
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        positions = (attention_mask.cumsum(1) - 1).clamp(min=0)
        return self.step(self.embed_tokens(input_ids), attention_mask, positions)[0]


def _init(m: nn.Module) -> None:
    if isinstance(m, (nn.Linear, nn.Embedding)):
        nn.init.normal_(m.weight, std=0.02)
        if getattr(m, "bias", None) is not None:
            nn.init.zeros_(m.bias)


class _Step(nn.Module):
    """The exported LLM step: flat cache inputs/outputs in HF's per-layer naming order."""

    def __init__(self, model: CachedDecoderLM):
        super().__init__()
        self.model = model

    def forward(
        self,
        inputs_embeds: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        logits_to_keep: torch.Tensor,
        *past: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        pairs = [(past[2 * i], past[2 * i + 1]) for i in range(len(past) // 2)]
        logits, new_kv = self.model.step(inputs_embeds, attention_mask, position_ids, pairs, logits_to_keep)
        return (logits, *(t for kv in new_kv for t in kv))


def check_sliding_window(model_type: str, window: int | None, max_context: int) -> None:
    """A sliding window masks keys `window` or more positions back. The cache holds `max_context`
    slots (slot = position), so a window of at least `max_context` never masks anything and the
    full-attention step is exact; a shorter one would need a banded mask the step does not build."""
    if window is not None and window < max_context:
        raise UnsupportedError(
            f"{model_type} sliding_window {window} is shorter than max_context {max_context}: the "
            f"step attends to every cache slot (no banded mask); choose max_context <= {window}"
        )


def cache_names(layers: int) -> tuple[list[str], list[str]]:
    """(past input names, present output names), key then value per layer, HF/ORT GenAI style."""
    past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    return past, present


def components(cfg: DecoderConfig) -> tuple[ComponentDecl, ...]:
    """`embed` (token ids -> embeddings) and `llm` (one cached step over embeddings)."""
    t, hkv, d = cfg.max_context, cfg.n_kv_heads, cfg.head_dim
    batch, seq = DimRange(1, 1, 8), DimRange(1, min(16, t), t)
    past_names, present_names = cache_names(cfg.layers)
    return (
        ComponentDecl(
            name="embed",
            role="token_embed",
            inputs=(TensorSpec("input_ids", "int64", ("batch", "sequence")),),
            outputs=(TensorSpec("inputs_embeds", "float32", ("batch", "sequence", cfg.embed_dim)),),
            dims={"batch": batch, "sequence": seq},
            build=bound("embed_tokens"),
            calibration_data="none",
            int_ranges={"input_ids": (0, cfg.vocab_size)},
        ),
        ComponentDecl(
            name="llm",
            role="llm_step",
            inputs=(
                TensorSpec("inputs_embeds", "float32", ("batch", "sequence", cfg.embed_dim)),
                TensorSpec("attention_mask", "int64", ("batch", "total_sequence")),
                TensorSpec("position_ids", "int64", ("batch", "sequence")),
                TensorSpec("logits_to_keep", "int64", (1,)),
                *(TensorSpec(n, "float32", ("batch", hkv, t, d)) for n in past_names),
            ),
            outputs=(
                TensorSpec("logits", "float32", ("batch", "kept", cfg.vocab_size)),
                *(TensorSpec(n, "float32", ("batch", hkv, "sequence", d)) for n in present_names),
            ),
            dims={"batch": batch, "sequence": seq, "total_sequence": DimRange(t + 1, t + seq.opt, 2 * t)},
            build=_Step,
            calibration_data="none",  # weight-only quantization; no activation calibration
            parity_atol=1e-3,
            int_ranges={"attention_mask": (1, 2), "position_ids": (0, t), "logits_to_keep": (1, seq.opt)},
        ),
    )


def llm_section(cfg: DecoderConfig) -> LLMConfig:
    """The manifest's `llm` section: what the runtime's generation loop and fused builds need."""
    from mmedge.models.decoder import VARIANTS

    return LLMConfig(
        max_context=cfg.max_context,
        layers=cfg.layers,
        kv_heads=cfg.n_kv_heads,
        head_dim=cfg.head_dim,
        vocab_size=cfg.vocab_size,
        bos_token_id=cfg.bos_token_id,
        eos_token_id=cfg.eos_token_id,
        pad_token_id=cfg.pad_token_id,
        rope_theta=float(cfg.rope_theta) if VARIANTS[cfg.variant].rotary else None,
    )


def bos_marker(tokenizer_json: str, bos_token_id: int) -> str:
    """ "{bos}" when the tokenizer starts an encoded text with the LM's BOS (as HF processors encode
    prompts), else "": prompt templates insert BOS by id, never by tokenising it."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer_json)
    with_specials = tok.encode("a", add_special_tokens=True).ids
    plain = tok.encode("a", add_special_tokens=False).ids
    return "{bos}" if with_specials[:1] == [bos_token_id] and with_specials[1:] == plain else ""
