"""The meta-transformer family: one frozen encoder shared by every modality, a light tokenizer per
modality and a classification head per task (Meta-Transformer, Zhang et al. 2023).

Components, one graph each, on the runtime paths `points`, `audio` and `imu` (one per modality
present in the config):

- `<modality>_tokenizer` (modality_tokenizer): the path's sources -> `tokens` (batch, T, width);
  points: `point_groups` (batch, G, K, 3) and `point_centers` (batch, G, 3) from the runtime's
  FPS + kNN grouping; audio: `audio_values` (batch, 1, 128, 204), a log-mel filterbank; IMU:
  `imu_values` (batch, 6, 2000);
- `encoder` (shared_encoder): `tokens` -> `hidden_states`, the token count a symbolic dim
  (`sequence`, the range of the modalities' counts), so one graph serves every path (exported,
  calibrated and built once);
- `<modality>_head` (task_head): `hidden_states` -> `logits` (batch, classes) and the normalised
  pooled feature `<modality>_embeds`; the path yields the logits, whose classes the manifest's
  `classification` section names (`runtime.classification.ClassificationPipeline` reads them).

Weights of the encoder load from the official release or a clip-family checkpoint (`loaders`);
`modeling.freeze_encoder` and `modeling.encoder_sha256` are what a recipe trains and checks with.
"""

from __future__ import annotations

from torch import nn

from mmedge.models.component import ComponentDecl
from mmedge.models.meta_transformer.config import MetaTransformerConfig
from mmedge.models.meta_transformer.modeling import MetaTransformer
from mmedge.models.registry import Family, Sections, register
from mmedge.runtime.audio import AudioConfig as AudioInput
from mmedge.runtime.imu import ImuConfig as ImuInput
from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.modality_inputs import ModalitiesConfig
from mmedge.runtime.points import PointConfig
from mmedge.runtime.sections import ClassificationConfig

BATCH = DimRange(1, 1, 64)
# The package's tokenizer.json is unused (no text path); export writes one for every package.
_CONTEXT_LENGTH = 16
EMBEDS = {"points": "point_embeds", "audio": "audio_embeds", "imu": "imu_embeds"}


def _source_specs(cfg: MetaTransformerConfig, modality: str) -> tuple[TensorSpec, ...]:
    if modality == "points":
        p = cfg.points
        assert p is not None
        return (
            TensorSpec("point_groups", "float32", ("batch", p.groups, p.group_size, 3)),
            TensorSpec("point_centers", "float32", ("batch", p.groups, 3)),
        )
    if modality == "audio":
        a = cfg.audio
        assert a is not None
        return (TensorSpec("audio_values", "float32", ("batch", 1, a.mel_bins, a.frames)),)
    i = cfg.imu
    assert i is not None
    return (TensorSpec("imu_values", "float32", ("batch", i.channels, i.samples)),)


def components(cfg: MetaTransformerConfig) -> tuple[ComponentDecl, ...]:
    """A tokenizer per modality, the shared encoder on every modality's path, a head per modality."""
    width, present = cfg.encoder.width, cfg.modalities
    counts = sorted(cfg.modality(m).tokens for m in present)
    # the token count differs per modality: one symbolic dim, the range of every modality's count
    sequence = {"batch": BATCH, "sequence": DimRange(counts[0], counts[-1], counts[-1])}
    tokenizers = tuple(
        ComponentDecl(
            name=f"{m}_tokenizer",
            role="modality_tokenizer",
            inputs=_source_specs(cfg, m),
            outputs=(TensorSpec("tokens", "float32", ("batch", cfg.modality(m).tokens, width)),),
            dims={"batch": BATCH},
            build=lambda model, m=m: model.tokenizers[m],
            calibration_data=m,
            paths=(m,),
        )
        for m in present
    )
    encoder = ComponentDecl(
        name="encoder",
        role="shared_encoder",
        inputs=(TensorSpec("tokens", "float32", ("batch", "sequence", width)),),
        outputs=(TensorSpec("hidden_states", "float32", ("batch", "sequence", width)),),
        dims=sequence,
        build=lambda model: model.encoder,
        calibration_data="shared",  # calibrated once, on every modality's tokens
        paths=present,
    )
    heads = tuple(
        ComponentDecl(
            name=f"{m}_head",
            role="task_head",
            inputs=(TensorSpec("hidden_states", "float32", ("batch", cfg.modality(m).tokens, width)),),
            outputs=(
                TensorSpec("logits", "float32", ("batch", cfg.modality(m).classes)),
                TensorSpec(EMBEDS[m], "float32", ("batch", cfg.embed_dim)),
            ),
            dims={"batch": BATCH},
            build=lambda model, m=m: model.heads[m],
            calibration_data=m,
            paths=(m,),
        )
        for m in present
    )
    return (*tokenizers, encoder, *heads)


def labels(cfg: MetaTransformerConfig) -> ClassificationConfig:
    """Each present modality's class labels (the manifest's `classification` section): the
    config's, or "0" .. "N-1" for a head whose config names none."""
    out = {}
    for m in cfg.modalities:
        head = cfg.modality(m)
        out[m] = head.labels or tuple(str(i) for i in range(head.classes))
    return ClassificationConfig(labels=out)


def modalities(cfg: MetaTransformerConfig) -> ModalitiesConfig:
    """The runtime's preprocessing of each modality present (the manifest's `modalities` section)."""
    a, i, p = cfg.audio, cfg.imu, cfg.points
    return ModalitiesConfig(
        audio=None
        if a is None
        else AudioInput(clips=a.clips, clip_seconds=a.clip_seconds, mel_bins=a.mel_bins, frames=a.frames),
        imu=None if i is None else ImuInput(samples=i.samples, window=i.window),
        points=None if p is None else PointConfig(groups=p.groups, group_size=p.group_size),
    )


def sections(cfg: MetaTransformerConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    """The preprocessing of each modality (`modalities`) and the heads' class labels (`classification`)."""
    return Sections(
        context_length=_CONTEXT_LENGTH, pad_id=0, modalities=modalities(cfg), classification=labels(cfg)
    )


FAMILY = register(
    Family(
        name="meta-transformer",
        task="classification",
        variants=("shared-encoder",),
        summary="Meta-Transformer: per-modality tokenizers (points, audio, IMU), one frozen shared encoder, task heads",
        config_from_dict=MetaTransformerConfig.from_dict,
        variant_of=lambda cfg: "shared-encoder",
        build=MetaTransformer,
        components=components,
        preprocess=lambda cfg: None,
        sections=sections,
        recipe="mmedge.recipes.meta_transformer",
    )
)
