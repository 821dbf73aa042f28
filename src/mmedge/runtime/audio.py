"""Audio loading and ImageBind-style preprocessing (torch-free: numpy, soundfile, soxr).

`load_audio` decodes WAV/FLAC/OGG (a path or bytes, through libsndfile) or takes a numpy array
with its sample rate, checks the header against `AudioLimits` before decoding, mixes to mono
float32 and resamples with soxr. `audio_clips` then does what ImageBind's
`load_and_transform_audio_data` does after loading: three 2 s clips placed as pytorchvideo's
ConstantClipsPerVideoSampler places them, a Kaldi log-mel filterbank per clip (`audio_fbank`),
zero-padded or cropped to 204 frames and normalised -> (clips, 1, mel_bins, frames) float32.
soundfile and soxr come from the `audio` extra and are imported on first use.
"""

from __future__ import annotations

import io
import math
import os
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any, BinaryIO

import numpy as np

from mmedge.errors import ConfigError, InvalidInputError, MissingDependencyError
from mmedge.runtime.audio_fbank import fbank, window_sizes

__all__ = ["AudioConfig", "AudioLimits", "audio_clips", "clip_bounds", "load_audio", "preprocess_audio"]


@dataclass(frozen=True)
class AudioConfig:
    """What the audio encoder expects; the defaults are ImageBind's."""

    sample_rate: int = 16_000
    clip_seconds: float = 2.0
    clips: int = 3
    mel_bins: int = 128
    frames: int = 204  # 2 s make 198 frames; ImageBind pads to 204
    mean: float = -4.268
    std: float = 9.138

    def __post_init__(self) -> None:
        counts = {"sample_rate": self.sample_rate, "clips": self.clips, "mel_bins": self.mel_bins}
        for name, value in {**counts, "frames": self.frames}.items():
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"audio config {name}={value!r}; accepted: an integer >= 1")
        if not all(math.isfinite(v) for v in (self.clip_seconds, self.mean, self.std)) or self.std <= 0:
            raise ConfigError(f"audio config needs finite clip_seconds, mean and std > 0; got {self}")
        window = window_sizes(self.sample_rate)[0]
        if self.clip_seconds * self.sample_rate < window:  # a clip must hold one 25 ms analysis window
            raise ConfigError(f"audio clip_seconds={self.clip_seconds} is shorter than one 25 ms window")


@dataclass(frozen=True)
class AudioLimits:
    """Caps applied to every recording before it is decoded (from the file's header where there is one).

    `max_decoded_bytes` bounds the float32 samples the decoder allocates (frames x channels x 4).
    """

    max_bytes: int = 128 * 1024 * 1024
    max_seconds: float = 600.0
    min_sample_rate: int = 4_000  # below telephone rate (8 kHz) there is little left to hear
    max_sample_rate: int = 384_000  # the highest rate studio converters use
    max_channels: int = 32
    max_decoded_bytes: int = 512 * 1024 * 1024  # 10 minutes of 48 kHz 4-channel float32 fit
    formats: tuple[str, ...] = ("WAV", "WAVEX", "FLAC", "OGG")  # libsndfile's names


def load_audio(
    src: Any,
    sample_rate: int | None = None,
    *,
    target_rate: int = 16_000,
    limits: AudioLimits = AudioLimits(),
) -> np.ndarray:
    """A path, encoded bytes, or an array with its `sample_rate` -> new 1-D float32 mono at `target_rate`.

    Arrays are (frames,) or (frames, channels) float32/float64 (full scale +-1) or int16/int32 PCM.
    Channels are averaged (ImageBind itself reads only the first channel of a multichannel file).
    """
    if isinstance(src, np.ndarray):
        if sample_rate is None:
            raise InvalidInputError("an audio array needs its sample_rate (Hz)")
        data, rate = _from_array(src, sample_rate, limits)
    elif sample_rate is not None:
        raise InvalidInputError("sample_rate is for array input only; an audio file's header gives its own")
    elif isinstance(src, (bytes, bytearray, memoryview)):
        raw = bytes(src)
        _check_bytes(len(raw), limits)
        data, rate = _decode(io.BytesIO(raw), len(raw), limits)
    elif isinstance(src, (str, os.PathLike)):
        data, rate = _decode_path(os.fspath(src), limits)
    else:
        accepted = "a path, bytes, or a numpy array (frames,) or (frames, channels) with sample_rate"
        raise InvalidInputError(f"cannot load audio from {type(src).__name__}; accepted: {accepted}")
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    return _resample(np.ascontiguousarray(mono), rate, target_rate)


def _soundfile() -> Any:
    try:
        import soundfile
    except (ImportError, OSError) as exc:  # OSError: the module is there but libsndfile is not
        raise MissingDependencyError(
            f"soundfile (libsndfile) is needed to decode audio and could not be imported ({exc}); "
            "install it with: pip install 'mmedge[audio]'"
        ) from exc
    return soundfile


def _check_bytes(size: int, limits: AudioLimits) -> None:
    if size == 0:
        raise InvalidInputError("audio file is empty (0 bytes)")
    if size > limits.max_bytes:
        raise InvalidInputError(f"audio file is {size} bytes; the limit is {limits.max_bytes} bytes")


def _check_rate(rate: Any, limits: AudioLimits) -> int:
    if isinstance(rate, bool) or not isinstance(rate, (int, np.integer)):
        raise InvalidInputError(f"audio sample rate {rate!r} is not a whole number of Hz")
    lo, hi = limits.min_sample_rate, limits.max_sample_rate
    if not lo <= rate <= hi:
        raise InvalidInputError(f"audio sample rate is {rate} Hz; the accepted range is {lo} to {hi} Hz")
    return int(rate)


def _check_shape(frames: int, channels: int, rate: int, limits: AudioLimits) -> None:
    """Checks that need only the header: run before a single sample is decoded."""
    if channels < 1 or channels > limits.max_channels:
        raise InvalidInputError(f"audio has {channels} channels; the limit is 1 to {limits.max_channels}")
    if frames <= 0:
        raise InvalidInputError("audio has no samples")
    if frames / rate > limits.max_seconds:
        secs = frames / rate
        raise InvalidInputError(f"audio lasts {secs:.1f} s; the limit is {limits.max_seconds:g} s")
    if frames * channels * 4 > limits.max_decoded_bytes:
        need, cap = frames * channels * 4, limits.max_decoded_bytes
        raise InvalidInputError(f"audio decodes to {need} bytes of float32; the limit is {cap} bytes")


def _decode_path(path: str, limits: AudioLimits) -> tuple[np.ndarray, int]:
    if "\x00" in path:  # os.stat would raise a bare ValueError
        raise InvalidInputError("audio path contains a NUL character")
    try:
        os.fsencode(path)
    except UnicodeEncodeError as exc:  # a lone surrogate has no file-system spelling
        raise InvalidInputError(f"audio path {path[:200]!r} is not valid Unicode: {exc.reason}") from None
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):  # a FIFO or device would block or never end
            raise InvalidInputError(f"audio path {path!r} is not a regular file")
        _check_bytes(info.st_size, limits)
        with open(path, "rb") as f:  # libsndfile reads through this handle, only what it needs
            return _decode(f, info.st_size, limits)
    except OSError as exc:
        raise InvalidInputError(f"cannot read audio file {path!r}: {exc.strerror or exc}") from exc


def _decode(f: BinaryIO, size: int, limits: AudioLimits) -> tuple[np.ndarray, int]:
    """(frames, channels) float32 and the sample rate, decoded only after the header passed the limits."""
    short = _wav_shortfall(f, size)
    if short is not None:  # libsndfile would silently decode the part that is there
        raise InvalidInputError(
            f"truncated WAV: its header declares {short[0]} bytes of samples, the file holds {short[1]}"
        )
    sf = _soundfile()
    f.seek(0)
    try:
        snd = sf.SoundFile(f)
    except (RuntimeError, TypeError) as exc:  # LibsndfileError: "Format not recognised" and kin
        raise InvalidInputError(
            f"not a readable audio file ({_reason(exc)}); accepted: {limits.formats}"
        ) from exc
    with snd:
        if snd.format not in limits.formats:
            raise InvalidInputError(f"audio format {snd.format} is not accepted; accepted: {limits.formats}")
        rate = _check_rate(snd.samplerate, limits)
        _check_shape(snd.frames, snd.channels, rate, limits)
        try:
            data = snd.read(snd.frames, dtype="float32", always_2d=True)
        except RuntimeError as exc:  # e.g. "flac decoder lost sync" on a cut-off FLAC
            raise InvalidInputError(f"corrupt or truncated {snd.format} audio: {_reason(exc)}") from exc
        if len(data) < snd.frames:
            raise InvalidInputError(
                f"truncated {snd.format} audio: the header declares {snd.frames} frames, {len(data)} decoded"
            )
    _check_finite(data)  # float WAVs can carry NaN/inf
    return data, rate


def _reason(exc: Exception) -> str:
    return str(exc).rsplit(":", 1)[-1].strip() or type(exc).__name__  # drop libsndfile's "<file object>:"


_MAX_CHUNKS = 1024  # RIFF chunks before `data`; real files have a handful
_UNKNOWN_LENGTH = 0x7FFF_F000  # data sizes from here up are placeholders, not promises


def _wav_shortfall(f: BinaryIO, size: int) -> tuple[int, int] | None:
    """(declared, present) sample bytes when a RIFF/WAVE file's data chunk runs past the file's end."""
    f.seek(0)
    head = f.read(12)
    if len(head) < 12 or head[:4] != b"RIFF" or head[8:12] != b"WAVE":
        return None  # not a WAV: libsndfile judges it
    pos = 12
    for _ in range(_MAX_CHUNKS):
        f.seek(pos)
        chunk = f.read(8)
        if len(chunk) < 8:
            return None  # no data chunk; libsndfile refuses it
        declared = int.from_bytes(chunk[4:], "little")
        if chunk[:4] == b"data":
            present = size - pos - 8
            # Streaming writers leave the length unknown as 0, 0x7FFFFFFF (arecord) or 0xFFFFFFFF;
            # libsndfile then reads to the end, and so do we.
            return (declared, present) if present < declared < _UNKNOWN_LENGTH else None
        pos += 8 + declared + (declared & 1)  # chunks are padded to even sizes
    return None


def _check_finite(data: np.ndarray) -> None:
    if not np.isfinite(data).all():
        raise InvalidInputError("audio contains NaN or infinite samples (or values beyond float32's range)")


_PCM_SCALE = {np.dtype(np.int16): 2.0**-15, np.dtype(np.int32): 2.0**-31}  # as libsndfile reads PCM
_ARRAY_DTYPES = ("float32", "float64", "int16", "int32")


def _from_array(arr: np.ndarray, sample_rate: Any, limits: AudioLimits) -> tuple[np.ndarray, int]:
    rate = _check_rate(sample_rate, limits)
    if arr.dtype.name not in _ARRAY_DTYPES:
        raise InvalidInputError(f"audio array dtype {arr.dtype}; accepted: {', '.join(_ARRAY_DTYPES)}")
    if arr.ndim not in (1, 2):
        raise InvalidInputError(
            f"audio array has shape {arr.shape}; accepted: (frames,) or (frames, channels)"
        )
    frames, channels = (arr.shape[0], 1) if arr.ndim == 1 else arr.shape
    if arr.ndim == 2 and channels > limits.max_channels >= frames:
        raise InvalidInputError(f"audio array has shape {arr.shape}: (channels, frames)? pass its transpose")
    _check_shape(frames, channels, rate, limits)
    scale = _PCM_SCALE.get(arr.dtype)
    data = arr.reshape(frames, channels).astype(np.float32)  # always a copy, never the caller's array
    if scale is not None:
        data *= np.float32(scale)
    _check_finite(data)
    return data, rate


def _resample(mono: np.ndarray, rate: int, target: int) -> np.ndarray:
    if rate == target:
        return mono.astype(np.float32)
    try:
        import soxr
    except ImportError as exc:
        raise MissingDependencyError(
            f"soxr is needed to resample audio from {rate} Hz to {target} Hz and could not be imported "
            f"({exc}); install it with: pip install 'mmedge[audio]'"
        ) from exc
    out = np.asarray(soxr.resample(mono, rate, target, quality="HQ"), np.float32)
    # torchaudio's resample (ImageBind's) returns ceil(n * target / rate) samples; soxr rounds to
    # nearest. Match the length so the clips start where ImageBind's would.
    want = -(-len(mono) * target // rate)
    return np.pad(out[:want], (0, max(0, want - len(out))))


def clip_bounds(num_samples: int, config: AudioConfig = AudioConfig()) -> list[tuple[int, int]]:
    """[start, end) sample indices of each clip, as ImageBind places them.

    pytorchvideo's ConstantClipsPerVideoSampler starts clip k at k * max(duration - clip, 0) / clips
    (divided by clips, not clips - 1: the last clip ends before the recording does), in exact
    fractions of the float duration; ImageBind truncates start and end times x rate to samples.
    A recording shorter than a clip gives `clips` copies of the whole recording.
    """
    rate, clip = config.sample_rate, Fraction(config.clip_seconds)
    duration = num_samples / rate  # a float, as ImageBind computes it
    step = Fraction(max(duration - float(clip), 0.0)) / config.clips
    return [
        (int(k * step * rate), min(int((k * step + clip) * rate), num_samples)) for k in range(config.clips)
    ]


def audio_clips(wave: np.ndarray, config: AudioConfig = AudioConfig()) -> np.ndarray:
    """One mono recording at `config.sample_rate` (see load_audio) -> (clips, 1, mel_bins, frames) float32."""
    if not isinstance(wave, np.ndarray) or wave.ndim != 1 or wave.dtype not in (np.float32, np.float64):
        what = f"{wave.dtype} {wave.shape}" if isinstance(wave, np.ndarray) else type(wave).__name__
        raise InvalidInputError(f"audio_clips takes a 1-D float waveform (see load_audio), not {what}")
    window = window_sizes(config.sample_rate)[0]
    if len(wave) < window:  # ImageBind divides by the frame count here and fails
        ms = 1000 * len(wave) / config.sample_rate
        raise InvalidInputError(
            f"audio is {len(wave)} samples ({ms:.1f} ms); the minimum is one 25 ms window ({window} samples)"
        )
    _check_finite(wave)
    wave = wave.astype(np.float32, copy=False)
    out = np.zeros((config.clips, 1, config.mel_bins, config.frames), np.float32)  # zero = padding
    for i, (start, end) in enumerate(clip_bounds(len(wave), config)):
        clip = wave[start:end]
        # ImageBind removes the clip's mean first. Kaldi removes each frame's mean anyway, so this
        # changes only rounding; it is kept so the arithmetic follows the original step by step.
        feats = fbank(clip - clip.mean(), config.sample_rate, config.mel_bins)  # (frames, mel_bins)
        keep = min(len(feats), config.frames)
        out[i, 0, :, :keep] = feats[:keep].T
    # Normalised after padding, as ImageBind does: padded frames read (0 - mean) / std, not 0.
    out -= np.float32(config.mean)
    out /= np.float32(config.std)
    return out


def preprocess_audio(
    sources: Sequence[Any],
    sample_rate: int | None = None,
    *,
    config: AudioConfig = AudioConfig(),
    limits: AudioLimits = AudioLimits(),
) -> np.ndarray:
    """Recordings (paths, bytes, or arrays sharing `sample_rate`) -> (N, clips, 1, mel_bins, frames) float32."""
    if isinstance(sources, (str, bytes, bytearray, np.ndarray, os.PathLike)):
        raise InvalidInputError("preprocess_audio takes a list of recordings, not a single one")
    if len(sources) == 0:
        raise InvalidInputError("preprocess_audio got no recordings")
    return np.stack(
        [
            audio_clips(load_audio(s, sample_rate, target_rate=config.sample_rate, limits=limits), config)
            for s in sources
        ]
    )
