"""Kimi-Audio's text-path prefill in PyTorch, for `affjax bench --model kimi-audio` only.

The official code (MoonshotAI/Kimi-Audio, modeling_moonshot_kimia.py) is remote code on top of
transformers' modules: a Whisper encoder (the `whisper-large-v3/` folder, used whole-window), the
vq_adaptor (Linear, SiLU, Dropout, Linear, LayerNorm), the fused embedding and a Qwen2 decoder. This
module composes the same transformers modules (WhisperEncoder, Qwen2Model) batched, as a benchmark's
other side; the parity judge is tests/kimi_reference.py, not this. It runs the text path only: the
bench config has no MIMO layers, so both sides do the same work (the official forward would also
run the MIMO branch and its audio logits).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from affjax.models.kimi_audio.params import WHISPER_DIR


class KimiTorch(nn.Module):
    def __init__(self, c: dict):
        from transformers import Qwen2Config, WhisperConfig
        from transformers.models.qwen2.modeling_qwen2 import Qwen2Model, Qwen2RMSNorm
        from transformers.models.whisper.modeling_whisper import WhisperEncoder

        super().__init__()
        drop = ("architectures", "model_type", "whisper_config")
        d, eps = c["hidden_size"], c["rms_norm_eps"]
        self.whisper = WhisperEncoder(WhisperConfig(**c["whisper_config"]))
        self.model = Qwen2Model(Qwen2Config(**{k: v for k, v in c.items() if k not in drop}))
        self.vq_adaptor = nn.Sequential(nn.Linear(c["kimia_adaptor_input_dim"], d), nn.SiLU(), nn.Dropout(0.0),
                                        nn.Linear(d, d), nn.LayerNorm(d, eps=eps))
        self.lm_head = nn.Linear(d, c["vocab_size"], bias=False)
        # loaded as the release has them (affjax's model needs them), unused on the text path
        self.mimo_norm = Qwen2RMSNorm(d, eps=eps)
        self.mimo_output = nn.Linear(d, c["vocab_size"], bias=False)

    def release_state_dict(self) -> dict[str, torch.Tensor]:
        """The parameters under the release's names (affjax.models.kimi_audio.params.KEYS)."""
        sd = {f"{WHISPER_DIR}/model.encoder.{k}": v for k, v in self.whisper.state_dict().items()}
        sd.update({f"model.{k}": v for k, v in self.model.state_dict().items()})
        sd.update({f"model.vq_adaptor.layers.{k}": v for k, v in self.vq_adaptor.state_dict().items()})
        sd.update({"lm_head.weight": self.lm_head.weight, "model.mimo_norm.weight": self.mimo_norm.weight,
                   "mimo_output.weight": self.mimo_output.weight})
        return sd

    @torch.inference_mode()
    def prefill(self, ids, continuous, audio_index, features):
        """ids ['B T 2'] (audio, text streams), continuous Bool['B T'], audio_index ['B T'] (each code
        position's 12.5 Hz token, flat over the windows), features ['W n_mels 3000'] -> the last
        position's text logits, the KV cache built (use_cache)."""
        h = self.whisper(features).last_hidden_state  # ['W 1500 d'], whole windows
        w, t, d = h.shape
        frames = h.reshape(w * t // 4, 4 * d)  # 4 frames stacked per token
        # as the official embedding: the features spread over the sequence, the adaptor on all of it
        expanded = torch.where(continuous[..., None], frames[audio_index], 0.0)
        embed = self.model.embed_tokens
        a = embed(ids[..., 0])
        fused = (a + self.vq_adaptor(expanded)) * math.sqrt(2.0)
        x = torch.where(continuous[..., None], fused, a) + embed(ids[..., 1])
        out = self.model(inputs_embeds=x, attention_mask=torch.ones(ids.shape[:2], dtype=torch.long),
                         use_cache=True).last_hidden_state
        return self.lm_head(out[:, -1])


def build(config: dict, seed: int, dtype: str, device: str):
    """A random KimiTorch of `config` (a Kimi config.json with its Whisper config embedded) and the
    same weights in affjax's KimiAudio."""
    import jax.numpy as jnp
    from flax import nnx

    from affjax.models.kimi_audio import params as kimi_params
    from affjax.models.kimi_audio.modeling import KimiAudio, KimiAudioConfig
    from affjax.models.layers import abstract_module
    from affjax.models.weights import KeyTable, iter_state_dict, load_streaming

    torch.manual_seed(seed)
    ref = KimiTorch(config).to(dtype=getattr(torch, dtype)).eval()
    cfg = KimiAudioConfig.from_hf(config)
    abstract = abstract_module(lambda rngs: KimiAudio(cfg, dtype=jnp.dtype(dtype), rngs=rngs))
    state = load_streaming(abstract, KeyTable(kimi_params.KEYS, kimi_params.KEY_ALIASES),
                           iter_state_dict(ref.release_state_dict()), dtype=jnp.dtype(dtype))
    return ref.to(device), nnx.merge(nnx.split(abstract)[0], state), cfg


def prefill_call(ref: KimiTorch, batch, device: str, dtype: str):
    """The PyTorch prefill of a Kimi batch, as a no-argument call."""
    t = lambda x: torch.from_numpy(np.asarray(x)).to(device)  # noqa: E731
    ids, cont, index = t(batch.ids).long(), t(batch.span > 0), t(batch.audio_index).long()
    feats = t(batch.features).to(getattr(torch, dtype))
    return lambda: ref.prefill(ids, cont, index, feats)
