"""The torch-free audio path: decode, resample, ImageBind's clips, Kaldi fbank, pad, normalise, limits."""

from __future__ import annotations

import functools
import io
import math
import sys
import time
from pathlib import Path

import numpy as np
import pytest

sf = pytest.importorskip("soundfile")
pytest.importorskip("soxr")

from mmedge.errors import ConfigError, InvalidInputError, MissingDependencyError
from mmedge.runtime.audio import (
    AudioConfig,
    AudioLimits,
    audio_clips,
    clip_bounds,
    load_audio,
    preprocess_audio,
)
from mmedge.runtime.audio_fbank import fbank, mel_matrix

MEAN, STD = -4.268, 9.138
EPS32 = float(np.finfo(np.float32).eps)
PAD = (0.0 - MEAN) / STD  # a padded frame after normalisation
SILENT = (math.log(EPS32) - MEAN) / STD  # a frame of digital silence after normalisation


# --- a float64 reference of Kaldi's fbank, transcribed from its definition (not from the runtime) ---


def _mel(hz: float) -> float:
    return 1127.0 * math.log(1.0 + hz / 700.0)


@functools.lru_cache(maxsize=4)
def _kaldi_banks(sr: int, nfft: int, bins: int) -> np.ndarray:
    """Kaldi's MelBanks loop: FFT bins strictly inside each triangle, the Nyquist bin never used."""
    low, high = _mel(20.0), _mel(sr / 2)
    delta = (high - low) / (bins + 1)
    banks = np.zeros((bins, nfft // 2))
    for b in range(bins):
        left, centre, right = low + b * delta, low + (b + 1) * delta, low + (b + 2) * delta
        for i in range(nfft // 2):
            m = _mel(i * sr / nfft)
            if left < m < right:
                banks[b, i] = (m - left) / (centre - left) if m <= centre else (right - m) / (right - centre)
    return banks


def kaldi_fbank_reference(wave: np.ndarray, sr: int = 16000, bins: int = 128) -> np.ndarray:
    """Kaldi fbank with ImageBind's options, frame by frame in float64: snip_edges framing, DC removal,
    pre-emphasis 0.97 (sample 0 against itself), symmetric Hann window, |FFT|^2 zero-padded to a power
    of two, mel banks, log floored at float32 epsilon."""
    win, shift = round(sr * 0.025), round(sr * 0.010)
    nfft = 1
    while nfft < win:
        nfft *= 2
    banks = _kaldi_banks(sr, nfft, bins)
    hann = np.array([0.5 - 0.5 * math.cos(2 * math.pi * i / (win - 1)) for i in range(win)])
    count = 1 + (len(wave) - win) // shift if len(wave) >= win else 0
    out = np.empty((count, bins))
    for t in range(count):
        frame = np.array(wave[t * shift : t * shift + win], dtype=np.float64)
        frame -= frame.mean()
        frame = np.concatenate([[frame[0] - 0.97 * frame[0]], frame[1:] - 0.97 * frame[:-1]])
        padded = np.zeros(nfft)
        padded[:win] = frame * hann
        power = np.abs(np.fft.fft(padded)[: nfft // 2]) ** 2  # full complex FFT, Nyquist bin dropped
        out[t] = np.log(np.maximum(banks @ power, EPS32))
    return out


def _signal(sr: int, seconds: float, seed: int) -> np.ndarray:
    """Sines (one off the FFT grid) plus noise: every mel bin above 20 Hz carries energy."""
    rng = np.random.default_rng(seed)
    t = np.arange(int(sr * seconds)) / sr
    x = (
        0.3 * np.sin(2 * np.pi * 440 * t)
        + 0.1 * np.sin(2 * np.pi * 1234.5 * t)
        + 0.02 * rng.standard_normal(len(t))
    )
    return x.astype(np.float32)


def _tone(sr: int, seconds: float, hz: float, amp: float = 0.3) -> np.ndarray:
    return (amp * np.sin(2 * np.pi * hz * np.arange(int(sr * seconds)) / sr)).astype(np.float32)


def _write(path: Path, x: np.ndarray, sr: int, **kw: str) -> Path:
    sf.write(path, x, sr, **kw)
    return path


# --- the filterbank ---


def test_mel_banks_match_kaldis_loop_and_bin_3_is_empty() -> None:
    ours = mel_matrix(16000, 512, 128)
    ref = _kaldi_banks(16000, 512, 128)
    assert ours.shape == (257, 128)
    np.testing.assert_allclose(ours[:256].T, ref, atol=1e-12)
    assert not ours[256].any()  # the Nyquist bin is never weighed
    # 128 triangles over a 512-point FFT: bin 3 holds no FFT bin (why kaldi-native-fbank refuses this
    # configuration; torchaudio, which ImageBind used, keeps it at log(epsilon))
    assert [b for b in range(128) if not ref[b].any()] == [3]


@pytest.mark.parametrize("sr", [8000, 16000, 22050, 44100, 48000])
def test_fbank_matches_float64_kaldi_reference_after_resampling(sr: int) -> None:
    worst = 0.0
    for seconds in (0.3, 2.0, 3.7):
        wave = load_audio(_signal(sr, seconds, seed=sr), sr)  # resampled to 16 kHz
        assert len(wave) == math.ceil(len(_signal(sr, seconds, 0)) * 16000 / sr)
        ours, ref = fbank(wave, 16000, 128), kaldi_fbank_reference(wave)
        assert ours.dtype == np.float32 and ours.shape == ref.shape == (1 + (len(wave) - 400) // 160, 128)
        worst = max(worst, float(np.abs(ours - ref).max()))
    assert worst < 1e-3
    print(f"fbank vs float64 Kaldi reference, {sr} Hz input: max abs diff {worst:.2e}")


@pytest.mark.parametrize(("sr", "bins"), [(16000, 80), (8000, 23)])
def test_fbank_matches_kaldi_native_fbank_where_it_accepts_the_bank(sr: int, bins: int) -> None:
    knf = pytest.importorskip("kaldi_native_fbank")
    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = sr
    opts.frame_opts.dither = 0.0
    opts.frame_opts.window_type = "hanning"
    opts.mel_opts.num_bins = bins
    wave = _signal(sr, 1.5, seed=bins)
    online = knf.OnlineFbank(opts)
    online.accept_waveform(sr, wave.tolist())
    online.input_finished()
    theirs = np.stack([online.get_frame(i) for i in range(online.num_frames_ready)])
    ours = fbank(wave, sr, bins)
    assert ours.shape == theirs.shape
    # kaldi-native-fbank works in float32: its rounding in the quiet low bins is what remains
    assert np.abs(ours - theirs).max() < 2e-3


def test_fbank_of_a_signal_shorter_than_a_window_has_no_frames() -> None:
    assert fbank(np.zeros(399, np.float32), 16000, 128).shape == (0, 128)
    assert fbank(np.zeros(400, np.float32), 16000, 128).shape == (1, 128)


# --- ImageBind's clips ---


def test_clip_bounds_follow_constant_clips_per_video_sampler() -> None:
    # start_k = k * max(duration - 2 s, 0) / 3 (divided by 3, not 2), end = start + 2 s, both x 16000
    # truncated: the last clip of 10 s starts at 16/3 s = sample 85333 and ends before the recording.
    assert clip_bounds(160_000) == [(0, 32000), (42666, 74666), (85333, 117333)]
    assert clip_bounds(96_000) == [(0, 32000), (21333, 53333), (42666, 74666)]
    assert clip_bounds(32_000) == [(0, 32000)] * 3
    assert clip_bounds(16_000) == [(0, 16000)] * 3  # shorter than a clip: the whole recording, 3 times


def test_a_tone_only_in_the_last_clips_span_shows_up_only_in_the_last_clip(tmp_path: Path) -> None:
    # 6 s: clips [0, 2], [4/3, 10/3], [8/3, 14/3] s; only the last covers 3.6 s to 4.4 s
    x = np.zeros(96_000, np.float32)
    x[57_600:70_400] = _tone(16000, 0.8, 1000)
    feats = audio_clips(load_audio(_write(tmp_path / "late.wav", x, 16000)))
    assert feats.shape == (3, 1, 128, 204)
    np.testing.assert_allclose(feats[:2, 0, :, :198], SILENT, atol=1e-6)
    clip = feats[2, 0]
    start = 42_666  # the last clip's first sample; frame j reads samples start + 160 j .. + 400
    first = math.ceil((57_600 - start - 400) / 160)  # first frame that reaches the tone
    last = (70_400 - 1 - start) // 160  # last frame that starts inside it
    toned = np.nonzero((clip[:, :198] > SILENT + 1e-3).any(axis=0))[0]
    assert (toned[0], toned[-1]) == (first, last)


def test_the_tail_after_the_last_clip_is_never_sampled(tmp_path: Path) -> None:
    x = np.zeros(96_000, np.float32)
    x[-16_000:] = _tone(16000, 1.0, 1000)  # the last second of 6 s: after 14/3 s, where clip 3 ends
    feats = audio_clips(load_audio(_write(tmp_path / "tail.wav", x, 16000)))
    np.testing.assert_allclose(feats[:, 0, :, :198], SILENT, atol=1e-6)


# --- the whole path ---


def test_wav_and_flac_end_to_end_match_an_independent_pipeline(tmp_path: Path) -> None:
    pcm = (_signal(16000, 4.0, seed=7) * 32767).astype(np.int16)  # one quantisation for both files
    wav = _write(tmp_path / "a.wav", pcm, 16000, subtype="PCM_16")
    flac = _write(tmp_path / "a.flac", pcm, 16000, subtype="PCM_16")
    batch = preprocess_audio([wav, str(flac)])
    assert batch.shape == (2, 3, 1, 128, 204) and batch.dtype == np.float32
    np.testing.assert_array_equal(batch[0], batch[1])  # FLAC is lossless
    decoded, _ = sf.read(wav, dtype="float32")
    step = (4.0 - 2.0) / 3  # ConstantClipsPerVideoSampler's spacing for 4 s
    for k in range(3):
        start = int(k * step * 16000 + 1e-9)
        clip = decoded[start : start + 32000]
        ref = kaldi_fbank_reference(clip - clip.mean()).T  # (128, 198)
        expected = np.concatenate([ref, np.zeros((128, 6))], axis=1)
        np.testing.assert_allclose(batch[0, k, 0], (expected - MEAN) / STD, atol=1e-3 / STD)


def test_short_recordings_are_padded_and_normalised_after_padding() -> None:
    feats = audio_clips(load_audio(np.zeros(16_000, np.float32), 16000))  # 1 s of silence: 98 frames
    np.testing.assert_array_equal(feats[0], feats[2])
    np.testing.assert_allclose(feats[:, 0, :, :98], SILENT, atol=1e-6)
    np.testing.assert_allclose(feats[:, 0, :, 98:], PAD, atol=1e-6)
    cropped = audio_clips(load_audio(_signal(16000, 3.0, 1), 16000), AudioConfig(frames=100))
    full = audio_clips(load_audio(_signal(16000, 3.0, 1), 16000))
    np.testing.assert_array_equal(cropped, full[..., :100])


def _peak_bin(feats: np.ndarray) -> int:
    return int(np.bincount(feats[:, 0, :, :198].argmax(axis=1).ravel()).argmax())


@pytest.mark.parametrize("sr", [44100, 8000])
def test_resampled_tone_keeps_its_frequency(tmp_path: Path, sr: int) -> None:
    low, high = _mel(20.0), _mel(8000.0)
    centres = [700 * (math.exp((low + (b + 1) * (high - low) / 129) / 1127) - 1) for b in range(128)]
    expected = int(np.argmin([abs(c - 1000.0) for c in centres]))
    path = _write(tmp_path / f"tone{sr}.wav", _tone(sr, 3.0, 1000), sr, subtype="FLOAT")
    feats = audio_clips(load_audio(path))
    native = audio_clips(load_audio(_tone(16000, 3.0, 1000), 16000))
    assert _peak_bin(feats) == _peak_bin(native) == expected
    peak = feats[:, 0, expected - 1 : expected + 2, 5:190]  # away from the resampler's edges
    np.testing.assert_allclose(peak, native[:, 0, expected - 1 : expected + 2, 5:190], atol=0.01)


def test_stereo_is_mixed_to_mono(tmp_path: Path) -> None:
    x = _signal(16000, 2.5, seed=3)
    mono = audio_clips(load_audio(x, 16000))
    same = audio_clips(load_audio(_write(tmp_path / "s.wav", np.stack([x, x], 1), 16000, subtype="FLOAT")))
    np.testing.assert_allclose(same, mono, atol=1e-5)
    cancel = audio_clips(load_audio(np.stack([x, -x], 1), 16000))
    np.testing.assert_allclose(cancel[:, 0, :, :198], SILENT, atol=1e-6)


def test_ogg_bytes_and_int16_arrays_load_like_files(tmp_path: Path) -> None:
    buf = io.BytesIO()
    sf.write(buf, _tone(16000, 2.0, 1000), 16000, format="OGG", subtype="VORBIS")
    assert _peak_bin(audio_clips(load_audio(buf.getvalue()))) == _peak_bin(
        audio_clips(load_audio(_tone(16000, 2.0, 1000), 16000))
    )
    pcm = (_signal(16000, 1.0, 5) * 32767).astype(np.int16)
    path = _write(tmp_path / "p.wav", pcm, 16000, subtype="PCM_16")
    np.testing.assert_array_equal(load_audio(pcm, 16000), load_audio(path))


# --- bad input: each a typed error naming the limit ---


def _wav_bytes(x: np.ndarray, sr: int = 16000, subtype: str = "PCM_16") -> bytes:
    buf = io.BytesIO()
    sf.write(buf, x, sr, format="WAV", subtype=subtype)
    return buf.getvalue()


def test_bytes_that_are_not_audio() -> None:
    with pytest.raises(InvalidInputError, match=r"not a readable audio file.*WAV"):
        load_audio(b"this is plain text, not a recording\n" * 10)
    with pytest.raises(InvalidInputError, match=r"empty \(0 bytes\)"):
        load_audio(b"")


def test_a_truncated_wav_is_refused_not_read_short(tmp_path: Path) -> None:
    data = _wav_bytes(_signal(16000, 3.0, 0))  # 96000 bytes of samples
    cut = data[: len(data) // 2]
    with pytest.raises(InvalidInputError, match="truncated WAV: its header declares 96000 bytes"):
        load_audio(cut)
    (tmp_path / "cut.wav").write_bytes(cut)
    with pytest.raises(InvalidInputError, match="truncated WAV"):
        load_audio(tmp_path / "cut.wav")


@pytest.mark.parametrize("placeholder", [0x7FFFFFFF, 0xFFFFFFFF])
def test_a_streamed_wavs_unknown_length_is_not_called_truncated(placeholder: int) -> None:
    data = bytearray(_wav_bytes(np.zeros(8000, np.int16)))
    assert data[36:40] == b"data"
    data[40:44] = placeholder.to_bytes(4, "little")  # what arecord and pipes write: length unknown
    assert load_audio(bytes(data)).shape == (8000,)


def test_a_truncated_flac_is_refused() -> None:
    buf = io.BytesIO()
    sf.write(buf, _signal(16000, 3.0, 0), 16000, format="FLAC")
    with pytest.raises(InvalidInputError, match="truncated FLAC"):
        load_audio(buf.getvalue()[: len(buf.getvalue()) // 2])


def test_a_one_hour_recording_is_refused_before_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A real one-hour 16 kHz mono 16-bit WAV of silence: the header, then a sparse (unwritten) data chunk.
    frames = 3600 * 16000
    head = _wav_bytes(np.zeros(0, np.int16))[:44]
    head = (
        head[:4] + (36 + 2 * frames).to_bytes(4, "little") + head[8:40] + (2 * frames).to_bytes(4, "little")
    )
    path = tmp_path / "hour.wav"
    with open(path, "wb") as f:
        f.write(head)
        f.truncate(44 + 2 * frames)
    assert sf.info(path).frames == frames

    def no_decoding(*args: object, **kwargs: object) -> None:
        raise AssertionError("samples were decoded")

    monkeypatch.setattr(sf.SoundFile, "read", no_decoding)
    began = time.perf_counter()
    with pytest.raises(InvalidInputError, match=r"lasts 3600\.0 s; the limit is 600 s"):
        load_audio(path)
    assert time.perf_counter() - began < 0.5
    with pytest.raises(InvalidInputError, match=r"lasts 2\.0 s; the limit is 1 s"):  # arrays are capped too
        load_audio(np.zeros(32000, np.float32), 16000, limits=AudioLimits(max_seconds=1.0))


@pytest.mark.parametrize("rate", [0, 10**7])
def test_sample_rates_outside_the_range(rate: int) -> None:
    with pytest.raises(
        InvalidInputError, match=f"sample rate is {rate} Hz; the accepted range is 4000 to 384000"
    ):
        load_audio(np.zeros(16000, np.float32), rate)


def test_a_wav_header_claiming_10_mhz_is_refused() -> None:
    data = bytearray(_wav_bytes(_signal(16000, 0.5, 0)))
    data[24:28] = (10**7).to_bytes(4, "little")  # the fmt chunk's sample rate
    with pytest.raises(InvalidInputError, match="sample rate is 10000000 Hz"):
        load_audio(bytes(data))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_nan_and_infinite_samples(bad: float) -> None:
    x = _signal(16000, 1.0, 0)
    x[123] = bad
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        load_audio(x, 16000)
    with pytest.raises(InvalidInputError, match="NaN or infinite"):
        load_audio(_wav_bytes(x, subtype="FLOAT"))


def test_wrong_array_dtype_or_shape() -> None:
    with pytest.raises(InvalidInputError, match="dtype uint8; accepted: float32, float64, int16, int32"):
        load_audio(np.zeros(16000, np.uint8), 16000)
    with pytest.raises(InvalidInputError, match="dtype complex64"):
        load_audio(np.zeros(16000, np.complex64), 16000)
    with pytest.raises(InvalidInputError, match=r"shape \(2, 2, 4000\)"):
        load_audio(np.zeros((2, 2, 4000), np.float32), 16000)
    with pytest.raises(InvalidInputError, match=r"\(channels, frames\)\? pass its transpose"):
        load_audio(np.zeros((2, 16000), np.float32), 16000)
    with pytest.raises(InvalidInputError, match="no samples"):
        load_audio(np.zeros(0, np.float32), 16000)
    with pytest.raises(InvalidInputError, match="not a whole number of Hz"):
        load_audio(np.zeros(16000, np.float32), 16000.5)
    with pytest.raises(InvalidInputError, match="needs its sample_rate"):
        load_audio(np.zeros(16000, np.float32))
    with pytest.raises(InvalidInputError, match="sample_rate is for array input only"):
        load_audio(_wav_bytes(np.zeros(800, np.int16)), 16000)
    with pytest.raises(InvalidInputError, match="cannot load audio from list"):
        load_audio([0.0] * 16000)


def test_other_limits_name_themselves(tmp_path: Path) -> None:
    data = _wav_bytes(_signal(16000, 1.0, 0))
    with pytest.raises(InvalidInputError, match="the limit is 1000 bytes"):
        load_audio(data, limits=AudioLimits(max_bytes=1000))
    with pytest.raises(InvalidInputError, match="the limit is 1 to 1"):
        load_audio(np.zeros((800, 2), np.float32), 16000, limits=AudioLimits(max_channels=1))
    with pytest.raises(InvalidInputError, match="decodes to 64000 bytes of float32; the limit is 1000"):
        load_audio(data, limits=AudioLimits(max_decoded_bytes=1000))
    with pytest.raises(InvalidInputError, match="no samples"):
        load_audio(_wav_bytes(np.zeros(0, np.int16)))
    buf = io.BytesIO()
    sf.write(buf, _signal(16000, 0.5, 0), 16000, format="AIFF")
    with pytest.raises(InvalidInputError, match="format AIFF is not accepted"):
        load_audio(buf.getvalue())
    with pytest.raises(InvalidInputError, match=r"the minimum is one 25 ms window \(400 samples\)"):
        audio_clips(load_audio(np.zeros(399, np.float32), 16000))
    with pytest.raises(InvalidInputError, match="not a regular file"):
        load_audio(tmp_path)
    with pytest.raises(InvalidInputError, match="cannot read audio file"):
        load_audio(tmp_path / "missing.wav")
    with pytest.raises(InvalidInputError, match="a list of recordings"):
        preprocess_audio(np.zeros((2, 16000), np.float32), 16000)


def test_config_is_validated() -> None:
    with pytest.raises(ConfigError, match="std"):
        AudioConfig(std=0.0)
    with pytest.raises(ConfigError, match="clips=0"):
        AudioConfig(clips=0)
    with pytest.raises(ConfigError, match="shorter than one 25 ms window"):
        AudioConfig(clip_seconds=0.01)


def test_importing_the_audio_path_loads_neither_library() -> None:
    from child import run_child

    run_child(
        "import sys\nimport mmedge.runtime.audio\n"
        "assert not {'soundfile', 'soxr', 'kaldi_native_fbank'} & set(sys.modules), sorted(sys.modules)\n"
        "print('LAZY_OK')",
        "LAZY_OK",
    )


def test_missing_libraries_name_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "soundfile", None)  # import raises ImportError
    with pytest.raises(MissingDependencyError, match=r"mmedge\[audio\]"):
        load_audio(_wav_bytes(np.zeros(800, np.int16)))
    monkeypatch.setitem(sys.modules, "soxr", None)
    with pytest.raises(MissingDependencyError, match=r"soxr.*mmedge\[audio\]"):
        load_audio(np.zeros(800, np.float32), 8000)
    assert load_audio(np.zeros(800, np.float32), 16000).shape == (800,)  # 16 kHz needs no resampler
