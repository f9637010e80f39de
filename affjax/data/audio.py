"""Audio loading: any soundfile format (wav/flac/ogg), or headerless ``.raw`` int16 LE at 16 kHz.

Returns float32 mono at the requested sample rate. Every failure raises :class:`AudioError` naming
the file and the cause.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import soxr

__all__ = ["AudioError", "load_audio", "split_windows", "RAW_SAMPLE_RATE"]

RAW_SAMPLE_RATE = 16000  # headerless .raw files: little-endian int16, mono, 16 kHz


class AudioError(ValueError):
    """An audio file is missing, unreadable, empty or holds non-finite samples."""


def _read_raw(path: Path) -> tuple[np.ndarray, int]:
    data = path.read_bytes()
    if len(data) % 2:
        raise AudioError(f"{path}: headerless .raw file has an odd number of bytes ({len(data)}); expected int16 LE")
    x = np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0
    return x, RAW_SAMPLE_RATE


def _read_soundfile(path: Path) -> tuple[np.ndarray, int]:
    import soundfile as sf  # deferred: soundfile (libsndfile) loads only for non-.raw files

    try:
        x, file_sr = sf.read(str(path), dtype="float32", always_2d=True)
    except Exception as e:  # soundfile.LibsndfileError, RuntimeError, TypeError on odd headers
        raise AudioError(f"{path}: unreadable or corrupt audio file ({type(e).__name__}: {e})") from e
    return x, int(file_sr)


def load_audio(path: str | os.PathLike, sr: int = 16000) -> np.ndarray:
    """Load ``path`` as a float32 mono waveform at ``sr`` Hz (mean downmix, soxr resampling)."""
    p = Path(path)
    if not p.exists():
        raise AudioError(f"{p}: audio file not found")
    if not p.is_file():
        raise AudioError(f"{p}: not a regular file")
    if sr <= 0:
        raise ValueError(f"sample rate must be positive, got {sr}")
    try:
        if p.suffix.lower() == ".raw":
            x, file_sr = _read_raw(p)
        else:
            x, file_sr = _read_soundfile(p)
    except OSError as e:
        raise AudioError(f"{p}: cannot read file ({e})") from e

    if x.ndim == 2:
        x = x.mean(axis=1) if x.shape[1] > 1 else x[:, 0]
    x = np.asarray(x, dtype=np.float32)
    if x.size == 0:
        raise AudioError(f"{p}: audio is empty (0 samples)")
    if not np.all(np.isfinite(x)):
        bad = int(np.count_nonzero(~np.isfinite(x)))
        raise AudioError(f"{p}: audio holds {bad} NaN/inf sample(s)")

    if file_sr != sr:
        x = soxr.resample(x, file_sr, sr, quality="HQ").astype(np.float32, copy=False)
        if x.size == 0:
            raise AudioError(f"{p}: audio is empty after resampling {file_sr} -> {sr} Hz")
    return np.ascontiguousarray(x, dtype=np.float32)


def split_windows(wave: np.ndarray, sr: int, seconds: float) -> list[np.ndarray]:
    """Consecutive windows of at most ``seconds`` (the last one shorter): how audio longer than an
    encoder's window is fed to it (Qwen2-Audio and Kimi-Audio both take 30 s windows)."""
    n = int(round(seconds * sr))
    return [wave[i:i + n] for i in range(0, max(len(wave), 1), n)]
