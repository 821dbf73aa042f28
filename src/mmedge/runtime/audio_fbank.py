"""Kaldi-compatible log-mel filterbank in numpy, as torchaudio.compliance.kaldi.fbank computes it.

Fixed to the options ImageBind (and AST before it) passes: snip_edges, no dither, per-frame DC
removal, pre-emphasis 0.97, a symmetric Hann ("hanning") window, the power spectrum of an FFT
padded to the next power of two, HTK-style mel triangles from 20 Hz to Nyquist, and log(max(e,
float32 epsilon)) with no energy column.

Why not kaldi-native-fbank: like Kaldi itself it refuses a mel bank with an empty triangle, and
ImageBind's 128 bins over a 512-point FFT at 16 kHz leave bin 3 without an FFT bin (torchaudio
keeps it and it reads log(epsilon) on every frame). So the formula is computed here, in float64;
the tests check it against a float64 reference of Kaldi's definition and, on settings
kaldi-native-fbank accepts, against kaldi-native-fbank itself.
"""

from __future__ import annotations

import functools

import numpy as np

__all__ = ["fbank", "frame_count", "mel_matrix", "window_sizes"]

PREEMPHASIS = 0.97
LOW_HZ = 20.0  # Kaldi's default low_freq; high_freq 0 means Nyquist
_LOG_FLOOR = float(np.finfo(np.float32).eps)  # torchaudio floors at the waveform dtype's epsilon


def window_sizes(sample_rate: int, frame_ms: float = 25.0, shift_ms: float = 10.0) -> tuple[int, int, int]:
    """(window, shift, padded FFT) in samples, rounded down as torchaudio rounds them."""
    window = int(sample_rate * frame_ms * 0.001)
    shift = int(sample_rate * shift_ms * 0.001)
    return window, shift, 1 << max(window - 1, 0).bit_length()


def frame_count(num_samples: int, sample_rate: int, frame_ms: float = 25.0, shift_ms: float = 10.0) -> int:
    """Frames snip_edges framing makes: only windows that fit wholly inside the signal."""
    window, shift, _ = window_sizes(sample_rate, frame_ms, shift_ms)
    return 0 if num_samples < window else 1 + (num_samples - window) // shift


def _mel(hz: np.ndarray | float) -> np.ndarray:
    return 1127.0 * np.log1p(np.asarray(hz, np.float64) / 700.0)


@functools.lru_cache(maxsize=8)
def mel_matrix(sample_rate: int, padded: int, mel_bins: int) -> np.ndarray:
    """(padded // 2 + 1, mel_bins) float64 triangles, evenly spaced in mel from 20 Hz to Nyquist.

    Kaldi weighs FFT bins strictly inside each triangle and never the Nyquist bin (its row is 0).
    min(rising, falling) clipped at 0 is that triangle: rising <= 1 <= falling left of the centre.
    """
    low, high = _mel(LOW_HZ), _mel(sample_rate / 2.0)
    step = (high - low) / (mel_bins + 1)
    left = low + step * np.arange(mel_bins)  # (mel_bins,)
    centre, right = left + step, left + 2 * step
    fft_mel = _mel(np.arange(padded // 2) * (sample_rate / padded))[:, None]  # (padded // 2, 1)
    rising = (fft_mel - left) / (centre - left)
    falling = (right - fft_mel) / (right - centre)
    weights = np.maximum(0.0, np.minimum(rising, falling))
    out = np.zeros((padded // 2 + 1, mel_bins))
    out[: padded // 2] = weights
    out.setflags(write=False)  # shared by the cache
    return out


def fbank(wave: np.ndarray, sample_rate: int, mel_bins: int) -> np.ndarray:
    """(frames, mel_bins) float32 log-mel energies of a 1-D waveform (25 ms windows, 10 ms shift).

    A signal shorter than one window gives (0, mel_bins), as Kaldi's snip_edges framing does.
    """
    window, shift, padded = window_sizes(sample_rate)
    count = frame_count(len(wave), sample_rate)
    if count == 0:
        return np.zeros((0, mel_bins), np.float32)
    x = np.asarray(wave, np.float64)
    frames = np.lib.stride_tricks.sliding_window_view(x, window)[::shift][:count]  # (frames, window)
    frames = frames - frames.mean(axis=1, keepdims=True)  # DC removed per frame, before pre-emphasis
    emphasised = np.empty_like(frames)
    emphasised[:, 1:] = frames[:, 1:] - PREEMPHASIS * frames[:, :-1]
    emphasised[:, 0] = frames[:, 0] * (1.0 - PREEMPHASIS)  # Kaldi's first sample uses itself as previous
    hann = 0.5 - 0.5 * np.cos(2.0 * np.pi * np.arange(window) / (window - 1))  # symmetric, as Kaldi's
    spectrum = np.fft.rfft(emphasised * hann, n=padded)  # zero-padded to a power of two
    power = spectrum.real**2 + spectrum.imag**2
    energies = power @ mel_matrix(sample_rate, padded, mel_bins)
    return np.log(np.maximum(energies, _LOG_FLOOR)).astype(np.float32)
