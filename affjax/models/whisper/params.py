"""Weight mapping: Hugging Face Whisper keys -> Flax NNX paths (see qwen2_audio/params.py for the
transforms). `ENCODER_KEYS` are relative to the encoder module (`model.encoder.` in Whisper
checkpoints, `audio_tower.` in Qwen2-Audio ones); `KEYS` covers the whole Whisper model."""

ENCODER_KEYS: list[tuple[str, str, str]] = [
    ("conv1.weight", "conv1.kernel", "conv"),
    ("conv1.bias", "conv1.bias", "copy"),
    ("conv2.weight", "conv2.kernel", "conv"),
    ("conv2.bias", "conv2.bias", "copy"),
    ("embed_positions.weight", "embed_positions", "copy"),
    ("layer_norm.weight", "layer_norm.scale", "copy"),
    ("layer_norm.bias", "layer_norm.bias", "copy"),
    ("layers.{i}.self_attn.q_proj.weight", "layers.{i}.q_proj.kernel", "linear"),
    ("layers.{i}.self_attn.q_proj.bias", "layers.{i}.q_proj.bias", "copy"),
    ("layers.{i}.self_attn.k_proj.weight", "layers.{i}.k_proj.kernel", "linear"),
    ("layers.{i}.self_attn.v_proj.weight", "layers.{i}.v_proj.kernel", "linear"),
    ("layers.{i}.self_attn.v_proj.bias", "layers.{i}.v_proj.bias", "copy"),
    ("layers.{i}.self_attn.out_proj.weight", "layers.{i}.out_proj.kernel", "linear"),
    ("layers.{i}.self_attn.out_proj.bias", "layers.{i}.out_proj.bias", "copy"),
    ("layers.{i}.self_attn_layer_norm.weight", "layers.{i}.self_attn_layer_norm.scale", "copy"),
    ("layers.{i}.self_attn_layer_norm.bias", "layers.{i}.self_attn_layer_norm.bias", "copy"),
    ("layers.{i}.fc1.weight", "layers.{i}.fc1.kernel", "linear"),
    ("layers.{i}.fc1.bias", "layers.{i}.fc1.bias", "copy"),
    ("layers.{i}.fc2.weight", "layers.{i}.fc2.kernel", "linear"),
    ("layers.{i}.fc2.bias", "layers.{i}.fc2.bias", "copy"),
    ("layers.{i}.final_layer_norm.weight", "layers.{i}.final_layer_norm.scale", "copy"),
    ("layers.{i}.final_layer_norm.bias", "layers.{i}.final_layer_norm.bias", "copy"),
]

DECODER_KEYS: list[tuple[str, str, str]] = [
    ("embed_tokens.weight", "embed_tokens", "copy"),
    ("embed_positions.weight", "embed_positions", "copy"),
    ("layer_norm.weight", "layer_norm.scale", "copy"),
    ("layer_norm.bias", "layer_norm.bias", "copy"),
    *[(f"layers.{{i}}.{attn}.{p}_proj.{w}", f"layers.{{i}}.{attn}.{p}_proj.{fx}", t)
      for attn in ("self_attn", "encoder_attn")
      for p, w, fx, t in (("q", "weight", "kernel", "linear"), ("q", "bias", "bias", "copy"),
                          ("k", "weight", "kernel", "linear"),  # Whisper has no k bias
                          ("v", "weight", "kernel", "linear"), ("v", "bias", "bias", "copy"),
                          ("out", "weight", "kernel", "linear"), ("out", "bias", "bias", "copy"))],
    *[(f"layers.{{i}}.{n}.{w}", f"layers.{{i}}.{n}.{fx}", "copy")
      for n in ("self_attn_layer_norm", "encoder_attn_layer_norm", "final_layer_norm")
      for w, fx in (("weight", "scale"), ("bias", "bias"))],
    ("layers.{i}.fc1.weight", "layers.{i}.fc1.kernel", "linear"),
    ("layers.{i}.fc1.bias", "layers.{i}.fc1.bias", "copy"),
    ("layers.{i}.fc2.weight", "layers.{i}.fc2.kernel", "linear"),
    ("layers.{i}.fc2.bias", "layers.{i}.fc2.bias", "copy"),
]

# The whole HF `WhisperForConditionalGeneration` state dict -> `Whisper` (modeling.py).
KEYS: list[tuple[str, str, str]] = [
    *[(f"model.encoder.{hf}", f"encoder.{fx}", t) for hf, fx, t in ENCODER_KEYS],
    *[(f"model.decoder.{hf}", f"decoder.{fx}", t) for hf, fx, t in DECODER_KEYS],
]

# The output projection is the token embedding (tied): the loader skips these keys.
TIED_KEYS: tuple[str, ...] = ("proj_out.weight",)
