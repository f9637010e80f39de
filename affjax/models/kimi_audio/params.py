"""Weight mapping and release layout of Kimi-Audio (moonshotai/Kimi-Audio-7B-Instruct).

Release layout: 453 tensors in model-1-of-35.safetensors .. model-35-of-35.safetensors and
model-36-of-36.safetensors (embed_tokens, norm, lm_head, mimo_output, mimo_norm), listed by
model.safetensors.index.json; a `whisper-large-v3/` subfolder with a Hugging Face Whisper model
(config.json, preprocessor_config.json, model.safetensors) of which only the encoder is used.
The converter reads the subfolder's tensors as `whisper-large-v3/<key>`.

Rows are (key pattern, NNX path template, transform), as in qwen2_audio/params.py.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from affjax.models.qwen2.params import KEYS as TEXT_KEYS
from affjax.models.whisper.params import ENCODER_KEYS

WHISPER_DIR = "whisper-large-v3"

KEYS: list[tuple[str, str, str]] = [
    *[(f"{WHISPER_DIR}/model.encoder.{hf}", f"audio_tower.{fx}", t) for hf, fx, t in ENCODER_KEYS],
    # nn.Sequential(Linear, SiLU, Dropout, Linear, LayerNorm): indices 0, 3, 4 hold weights
    ("model.vq_adaptor.layers.0.weight", "vq_adaptor.fc1.kernel", "linear"),
    ("model.vq_adaptor.layers.0.bias", "vq_adaptor.fc1.bias", "copy"),
    ("model.vq_adaptor.layers.3.weight", "vq_adaptor.fc2.kernel", "linear"),
    ("model.vq_adaptor.layers.3.bias", "vq_adaptor.fc2.bias", "copy"),
    ("model.vq_adaptor.layers.4.weight", "vq_adaptor.norm.scale", "copy"),
    ("model.vq_adaptor.layers.4.bias", "vq_adaptor.norm.bias", "copy"),
    # the Qwen2 decoder: model.embed_tokens, model.layers.{i}.*, model.norm, lm_head
    *[(hf, f"language_model.{fx}", t) for hf, fx, t in TEXT_KEYS],
    # the MIMO (audio-output) layers have the same names under model.mimo_layers.{i}
    *[(hf.replace("model.layers.", "model.mimo_layers."), "mimo_" + fx, t)
      for hf, fx, t in TEXT_KEYS if hf.startswith("model.layers.")],
    ("model.mimo_norm.weight", "mimo_norm.scale", "copy"),
    ("mimo_output.weight", "mimo_output", "copy"),
]

# A Whisper folder saved from WhisperModel (not ...ForConditionalGeneration) has no "model." prefix.
KEY_ALIASES: list[tuple[str, str]] = [
    (f"{WHISPER_DIR}/encoder.", f"{WHISPER_DIR}/model.encoder."),
    (f"{WHISPER_DIR}/decoder.", f"{WHISPER_DIR}/model.decoder."),
]

# Tensors the release has and the model deliberately leaves out (the converter lists them):
# RoPE buffers (34: 28 layers + 6 MIMO layers; RoPE is recomputed from rope_theta) and the
# Whisper text decoder with its output projection.
SKIPPED: tuple[str, ...] = (
    r"(^|\.)rotary_emb\.inv_freq$",
    rf"^{re.escape(WHISPER_DIR)}/model\.decoder\.",
    rf"^{re.escape(WHISPER_DIR)}/proj_out\.",
)
_SKIPPED = re.compile("|".join(SKIPPED))


def skipped(key: str) -> bool:
    """A (canonical) release key the model deliberately does not use."""
    return _SKIPPED.search(key) is not None


# Files of the release copied into a converted checkpoint beside the COPIED_FILES of
# affjax.models.checkpoint: the tiktoken vocabulary and the Whisper folder's configs.
COPIED: tuple[str, ...] = ("tiktoken.model", f"{WHISPER_DIR}/config.json", f"{WHISPER_DIR}/preprocessor_config.json")


def read_config(src: str | Path) -> dict:
    """config.json of a release folder with the Whisper folder's config embedded as
    "whisper_config" (what KimiAudioConfig.from_hf reads). Raises FileNotFoundError naming the
    missing file."""
    src = Path(src)
    cfg = json.loads((src / "config.json").read_text())
    wpath = src / WHISPER_DIR / "config.json"
    if not wpath.is_file():
        raise FileNotFoundError(f"{WHISPER_DIR}/config.json is missing from {src} (Kimi-Audio's audio encoder)")
    cfg["whisper_config"] = json.loads(wpath.read_text())
    return cfg
