"""Weight mapping: Hugging Face Qwen2 / Llama causal-LM keys -> Flax NNX paths of Qwen2ForCausalLM
(see qwen2_audio/params.py for the transforms)."""

KEYS: list[tuple[str, str, str]] = [
    ("model.embed_tokens.weight", "embed_tokens", "copy"),
    ("model.norm.weight", "norm.scale", "copy"),
    ("lm_head.weight", "lm_head", "copy"),  # absent when embeddings are tied
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.weight", f"layers.{{i}}.self_attn.{p}_proj.kernel", "linear")
      for p in "qkvo"],
    *[(f"model.layers.{{i}}.self_attn.{p}_proj.bias", f"layers.{{i}}.self_attn.{p}_proj.bias", "copy")
      for p in "qkv"],
    *[(f"model.layers.{{i}}.mlp.{p}_proj.weight", f"layers.{{i}}.mlp.{p}_proj.kernel", "linear")
      for p in ("gate", "up", "down")],
    ("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_layernorm.scale", "copy"),
    ("model.layers.{i}.post_attention_layernorm.weight", "layers.{i}.post_attention_layernorm.scale", "copy"),
]
