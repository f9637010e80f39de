"""Kimi-Audio in the benchmarks: the configs at bench widths and random inputs (no torch here; the
PyTorch side of `affjax bench --model kimi-audio` is affjax/bench/kimi_torch.py).

The vocabulary is the release's (168448) in every config: the prompt's control ids (151643..151675)
and the speech codes (152064 + code) index it. Only the last position's logits are computed in a
prefill, so its size barely counts in the time; it does in the parameter bytes.
"""

from __future__ import annotations

import numpy as np

_KIMI = {"architectures": ["MoonshotKimiaForCausalLM"], "model_type": "kimi_audio", "vocab_size": 168448,
         "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 8192, "tie_word_embeddings": False,
         # no MIMO layers: they are off the text path, and the PyTorch side leaves them out too
         "kimia_mimo_layers": 0, "kimia_mimo_transformer_from_layer_index": 0, "kimia_token_offset": 152064,
         "kimia_media_begin": 151661, "kimia_media_end": 151663}


def _whisper(d: int, layers: int, heads: int) -> dict:
    """Whisper-large-v3's stem (128 mel bins, 30 s windows) at width d."""
    return {"model_type": "whisper", "num_mel_bins": 128, "d_model": d, "encoder_layers": layers,
            "encoder_attention_heads": heads, "encoder_ffn_dim": 4 * d, "max_source_positions": 1500}


# `affjax bench --model kimi-audio`: the widths of the Qwen2-Audio prefill bench (BENCH_CONFIG)
BENCH_CONFIG = {**_KIMI, "hidden_size": 512, "num_hidden_layers": 8, "num_attention_heads": 8,
                "num_key_value_heads": 8, "intermediate_size": 1376, "kimia_adaptor_input_dim": 4 * 384,
                "whisper_config": _whisper(384, 4, 6)}

# `affjax bench-pooling --model kimi-audio`: Kimi-Audio-7B's 28 decoder layers and its MLP ratio
# (18944 / 3584) at the pooling bench's width (hidden 256), a small audio tower
POOLING_CONFIG = {**_KIMI, "hidden_size": 256, "num_hidden_layers": 28, "num_attention_heads": 4,
                  "num_key_value_heads": 4, "intermediate_size": 1354, "kimia_adaptor_input_dim": 4 * 128,
                  "whisper_config": _whisper(128, 2, 2)}


def inputs(cfg, batch: int, audio_seconds: float, text_tokens: int, *, exact: bool = True, seed: int = 0):
    """A Kimi batch (kimi_audio.inputs.Batch) of identical-shape items, as a job builds them: an
    instruction of `text_tokens` ordinary ids, then one clip of `audio_seconds` (ceil(s / 30)
    windows of random features, random speech codes). `exact`: the sequence buffer is the valid
    length; else the job path's bucket (shapes.bucket)."""
    from affjax.models.kimi_audio.inputs import Encoded, collate, prompt_streams

    rng = np.random.default_rng(seed)
    F = cfg.audio.mel_frames
    frames = max(1, int(round(audio_seconds * 100)))
    lengths = np.array([F] * ((frames - 1) // F) + [frames - (frames - 1) // F * F], np.int32)
    n_codes = int(sum(cfg.window_tokens(int(n)) for n in lengths))
    items = []
    for _ in range(batch):
        parts = [("text", rng.integers(0, 31000, text_tokens)), ("audio", rng.integers(0, 16384, n_codes))]
        audio, text, cont = prompt_streams(parts, token_offset=cfg.token_offset)
        feats = rng.standard_normal((len(lengths), cfg.audio.num_mel_bins, F)).astype(np.float32)
        items.append(Encoded(np.stack([audio, text], -1), cont, feats, lengths))
    return collate(items, batch_size=batch, tokens_per_window=cfg.tokens_per_window,
                   seq_len=len(items[0].ids) if exact else None)
