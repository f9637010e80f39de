"""Weight mapping: Hugging Face Whisper encoder keys -> Flax NNX paths (see qwen2_audio/params.py
for the transforms). Relative to the encoder module (`model.encoder.` in Whisper checkpoints,
`audio_tower.` in Qwen2-Audio ones)."""

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
