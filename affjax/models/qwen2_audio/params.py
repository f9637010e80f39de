"""Weight mapping: Hugging Face Qwen2-Audio state-dict keys -> Flax NNX parameter paths.

Each row is (HF key pattern, NNX path template, transform). `{i}` is a layer index. Transforms:
  linear: torch Linear weight (out, in) -> kernel (in, out)
  conv:   torch Conv1d weight (out, in, k) -> kernel (k, in, out)
  copy:   same layout
"""

from __future__ import annotations

from affjax.models.qwen2.params import KEYS as TEXT_KEYS
from affjax.models.whisper.params import ENCODER_KEYS

# The hub layout (what save_pretrained writes) prefixes the parts with these names.
KEYS: list[tuple[str, str, str]] = [
    *[(f"audio_tower.{hf}", f"audio_tower.{fx}", t) for hf, fx, t in ENCODER_KEYS],
    ("multi_modal_projector.linear.weight", "multi_modal_projector.kernel", "linear"),
    ("multi_modal_projector.linear.bias", "multi_modal_projector.bias", "copy"),
    *[(f"language_model.{hf}", f"language_model.{fx}", t) for hf, fx, t in TEXT_KEYS],
]

# transformers >= 5 may also name the parts model.audio_tower.*, model.language_model.* and lm_head.*;
# these prefixes are rewritten to the hub layout before the table is applied.
KEY_ALIASES: list[tuple[str, str]] = [
    ("model.audio_tower.", "audio_tower."),
    ("model.multi_modal_projector.", "multi_modal_projector."),
    ("model.language_model.", "language_model.model."),
    ("lm_head.", "language_model.lm_head."),
]
