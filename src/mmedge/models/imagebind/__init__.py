"""The imagebind family: image, text, audio, depth, thermal and IMU encoders into one space.

Each present modality is its own component on its own path, so a device loads only the modalities
it uses: `vision` (image_encoder: `pixel_values` -> `image_embeds`), `text` (text_encoder:
`input_ids`, `attention_mask` -> `text_embeds`), `audio` (audio_encoder: `audio_values`
(B, 1, 128, 204) -> `audio_embeds`), `depth` (depth_encoder: `depth_values` (B, 1, S, S)),
`thermal` (thermal_encoder: `thermal_values` (B, 1, S, S)), `imu` (imu_encoder: `imu_values`
(B, 6, 2000)) and, with the config's `video`, `video` (video_encoder: `video_values` (B, 3, 2, S, S),
two frames through the vision weights into the image space); the manifest's `modalities` section sizes the runtime's preprocessing to them. Every output is the official embedding before its postprocessor's scale: unit
length, so retrieval across any pair of modalities compares cosines. The scales (text's learned
one, audio 20, depth 5, thermal 10, IMU 5) go to the manifest's `retrieval.scales`, and text's also
to `retrieval.logit_scale`: image-text zero-shot probabilities are softmax(scale_text * cosine), as
the official image (unscaled) x text (scaled) logits. Checkpoints in the official key layout load
through `imagebind.official` (`mmedge export imagebind_huge.pth --family imagebind --allow-pickle`).
"""

from __future__ import annotations

from torch import nn

from mmedge.models.component import ComponentDecl, bound
from mmedge.models.dual_encoder import image_tower, text_tower
from mmedge.models.imagebind.config import ImageBindConfig
from mmedge.models.imagebind.modeling import VIDEO_FRAMES, ImageBind
from mmedge.models.imagebind.official import from_official
from mmedge.models.registry import Family, Sections, register
from mmedge.runtime.audio import AudioConfig as AudioInput
from mmedge.runtime.depth import DepthConfig as DepthInput
from mmedge.runtime.depth import ThermalConfig as ThermalInput
from mmedge.runtime.imu import IMU_CHANNELS
from mmedge.runtime.imu import ImuConfig as ImuInput
from mmedge.runtime.manifest import DimRange, TensorSpec
from mmedge.runtime.modality_inputs import ModalitiesConfig
from mmedge.runtime.sections import CLIP_MEAN, CLIP_STD, PreprocessConfig, RetrievalConfig
from mmedge.runtime.video import VideoConfig as VideoInput

LABEL_TEMPLATES = ("a photo of {}.", "a picture of {}.", "{}")
_BATCH = DimRange(1, 1, 64)


def _encoder(cfg: ImageBindConfig, modality: str, role: str, shape: tuple[int, ...]) -> ComponentDecl:
    """A single-input encoder: `<modality>_values` -> `<modality>_embeds`, its own calibration kind."""
    return ComponentDecl(
        name=modality,
        role=role,
        inputs=(TensorSpec(f"{modality}_values", "float32", ("batch", *shape)),),
        outputs=(TensorSpec(f"{modality}_embeds", "float32", ("batch", cfg.embed_dim)),),
        dims={"batch": _BATCH},
        build=bound(f"encode_{modality}"),
        calibration_data=modality,
    )


def components(cfg: ImageBindConfig) -> tuple[ComponentDecl, ...]:
    """One exportable encoder per present modality, in the official order."""
    d, out = cfg.embed_dim, []
    for m in cfg.present:
        if m == "vision":
            s = cfg.vision.image_size
            out.append(image_tower(s, d, _BATCH))
            if cfg.video:  # the same weights on 2-frame clips
                out.append(_encoder(cfg, "video", "video_encoder", (3, VIDEO_FRAMES, s, s)))
        elif m == "text":
            out.append(text_tower(cfg.text.vocab_size, cfg.text.context_length, d, _BATCH))
        elif m == "audio":
            out.append(_encoder(cfg, m, "audio_encoder", (1, cfg.audio.mel_bins, cfg.audio.frames)))
        elif m in ("depth", "thermal"):
            s = getattr(cfg, m).image_size
            out.append(_encoder(cfg, m, f"{m}_encoder", (1, s, s)))
        else:
            out.append(_encoder(cfg, m, "imu_encoder", (IMU_CHANNELS, cfg.imu.samples)))
    return tuple(out)


def preprocess(cfg: ImageBindConfig) -> PreprocessConfig:
    """ImageBind's vision transform: shortest edge to the input size (bicubic), centre crop, CLIP mean/std."""
    return PreprocessConfig(cfg.vision.image_size, CLIP_MEAN, CLIP_STD, resize="shortest", crop="center")


def modalities(cfg: ImageBindConfig) -> ModalitiesConfig:
    """The runtime's preprocessing of each further modality present (the manifest's `modalities`
    section), sized as the encoders' inputs, the audio cut into the config's clips; the rest is the
    runtime's ImageBind defaults (16 kHz audio, its filterbank normalisation, disparity and thermal
    scaling)."""
    has = set(cfg.present)
    a, i = cfg.audio, cfg.imu
    audio = AudioInput(mel_bins=a.mel_bins, frames=a.frames, clips=a.clips, clip_seconds=a.clip_seconds)
    return ModalitiesConfig(
        audio=audio if "audio" in has else None,
        depth=DepthInput(image_size=cfg.depth.image_size) if "depth" in has else None,
        thermal=ThermalInput(image_size=cfg.thermal.image_size) if "thermal" in has else None,
        imu=ImuInput(samples=i.samples, window=i.window) if "imu" in has else None,
        video=VideoInput(frames=VIDEO_FRAMES) if cfg.video else None,
    )


def sections(cfg: ImageBindConfig, model: nn.Module, tokenizer_json: str) -> Sections:
    assert isinstance(model, ImageBind)
    scales = model.logit_scales()
    return Sections(
        context_length=cfg.text.context_length,
        pad_id=cfg.text.pad_token_id,
        retrieval=RetrievalConfig(logit_scale=scales["text"], label_templates=LABEL_TEMPLATES, scales=scales),
        modalities=modalities(cfg),
    )


FAMILY = register(
    Family(
        name="imagebind",
        task="retrieval",
        variants=("imagebind",),
        summary="ImageBind: image, text, audio, depth, thermal and IMU encoders into one space",
        config_from_dict=ImageBindConfig.from_dict,
        variant_of=lambda cfg: "imagebind",
        build=ImageBind,
        components=components,
        preprocess=preprocess,
        sections=sections,
        official=from_official,
        recipe="mmedge.recipes.imagebind",
    )
)
