"""PyTorch reference for Kimi-Audio, and a tiny random release to test against.

`KimiReference` holds the parameters under the release's names (MoonshotKimiaForCausalLM:
model.embed_tokens, model.layers / model.mimo_layers of transformers' Qwen2DecoderLayer,
model.norm, model.mimo_norm, model.vq_adaptor.layers, lm_head, mimo_output) and computes what
modeling_moonshot_kimia.py computes, for one item at a time as the official code runs:
- `whisper_features`: kimia_infer's WhisperEncoder.tokenize_waveform: 30 s windows, log-mel of the
  window padded to 30 s (torch.stft; transformers' Slaney filter bank standing in for the
  release's mel_filters.npz), the encoder (transformers' WhisperEncoder of the whisper-large-v3
  folder) on the whole window, its first (L - 1) // 1280 + 1 tokens x 4 frames kept, windows
  concatenated, 4 frames stacked per token;
- `asr_streams`: KimiAPromptManager.get_prompt for [user text, user audio] (output_type="text"),
  written from the official code with literal ids;
- `embed`: the fused embedding of MoonshotKimiaModel.forward (media_begin/media_end segments, the
  adaptor, sqrt(2), + E(text));
- `forward`: the 28 (here few) layers, the MIMO branch from layer kimia_mimo_transformer_from_layer_index,
  the two norms; `lm_head` / `mimo_output` give text / audio logits;
- `layers`: a range of decoder layers over one sequence at given position ids (the pooled
  reference of tests/test_kimi_jobs.py runs the layer groups between stages with it);
- `greedy`: the official text generation loop, greedy: each step feeds (audio blank, the token).

`make_tiny_kimi_audio` writes a tiny random checkpoint in the release's on-disk layout.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch import nn

WHISPER_DIR = "whisper-large-v3"
# kimia_infer/utils/special_tokens.py ids (tokenization_kimia's special-token order from 151643)
MSG_END, MEDIA_BEGIN, MEDIA_END = 151645, 151661, 151663
TEXT_BLANK, TEXT_EOS = 151666, 151667
USER_START, ASSISTANT_START, SPEECH_CT = 151670, 151671, 151675
TOKEN_OFFSET = 152064
N_SAMPLES = 480000  # 30 s at 16 kHz


def asr_streams(instruction_ids, codes, continuation_ids=()):
    """(audio ids, text ids, is_continuous) lists for [user text, user audio] then the assistant's
    start, plus a scored continuation fed as (blank, token) pairs."""
    audio = [USER_START] + [TEXT_BLANK] * len(instruction_ids)
    text = [TEXT_BLANK] + list(instruction_ids)
    cont = [False] * len(audio)
    audio += [MEDIA_BEGIN] + [TOKEN_OFFSET + int(c) for c in codes] + [MEDIA_END, SPEECH_CT, MSG_END, ASSISTANT_START]
    text += [TEXT_BLANK] * (len(codes) + 5)
    cont += [False] + [True] * len(codes) + [False] * 4
    audio += [TEXT_BLANK] * len(continuation_ids)
    text += list(continuation_ids)
    cont += [False] * len(continuation_ids)
    return audio, text, cont


def random_items(seconds, prompt_words, *, rng_seed: int, wave_seed: int, prompt_seed: int):
    """[(16 kHz wave, random valid speech codes of its token count, instruction)] of the tests:
    synthetic speech-like clips of `seconds`, instructions of about `prompt_words` words."""
    from affjax.models.kimi_audio.inputs import code_count
    from affjax.testing import AUDIO_PLACEHOLDER, long_prompt, synth_speech_like

    rng = np.random.default_rng(rng_seed)
    out = []
    for i, (secs, words) in enumerate(zip(seconds, prompt_words)):
        wave = synth_speech_like(secs, seed=wave_seed + i)
        codes = rng.integers(0, 16384, code_count(wave))
        out.append((wave, codes, long_prompt(words, seed=prompt_seed + i).replace(AUDIO_PLACEHOLDER, "")))
    return out


def log_mel(window: np.ndarray, n_mels: int) -> torch.Tensor:
    """whisper_Lv3/whisper.py log_mel_spectrogram of pad_or_trim(window): ['n_mels 3000']."""
    from transformers.audio_utils import mel_filter_bank

    audio = torch.zeros(N_SAMPLES)
    audio[:len(window)] = torch.from_numpy(np.asarray(window, np.float32))
    stft = torch.stft(audio, 400, 160, window=torch.hann_window(400), return_complex=True)
    magnitudes = stft[..., :-1].abs() ** 2
    filters = torch.from_numpy(mel_filter_bank(201, n_mels, 0.0, 8000.0, 16000, norm="slaney", mel_scale="slaney")
                               .T.astype(np.float32))
    log_spec = torch.clamp(filters @ magnitudes, min=1e-10).log10()
    log_spec = torch.maximum(log_spec, log_spec.max() - 8.0)
    return (log_spec + 4.0) / 4.0


class VQAdaptor(nn.Module):
    def __init__(self, d_in, d, eps):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(d_in, d), nn.SiLU(), nn.Dropout(0.0), nn.Linear(d, d),
                                    nn.LayerNorm(d, eps=eps))

    def forward(self, x):
        return self.layers(x)


class KimiModel(nn.Module):
    def __init__(self, c: dict):
        from transformers import Qwen2Config
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer, Qwen2RMSNorm, Qwen2RotaryEmbedding

        super().__init__()
        drop = ("architectures", "auto_map", "model_type", "torch_dtype")
        qc = Qwen2Config(**{k: v for k, v in c.items() if k not in drop})
        qc._attn_implementation = "eager"
        self.c = c
        d, eps = c["hidden_size"], c["rms_norm_eps"]
        self.embed_tokens = nn.Embedding(c["vocab_size"], d)
        self.layers = nn.ModuleList([Qwen2DecoderLayer(qc, i) for i in range(c["num_hidden_layers"])])
        self.norm = Qwen2RMSNorm(d, eps=eps)
        self.mimo_layers = nn.ModuleList([Qwen2DecoderLayer(qc, i) for i in range(c["kimia_mimo_layers"])])
        self.mimo_norm = Qwen2RMSNorm(d, eps=eps)
        self.vq_adaptor = VQAdaptor(c["kimia_adaptor_input_dim"], d, eps)
        self.rotary_emb = Qwen2RotaryEmbedding(qc)  # buffers only (not saved by state_dict)


class KimiReference(nn.Module):
    """MoonshotKimiaForCausalLM's parameters and computation (float32, eager attention)."""

    def __init__(self, c: dict, whisper_encoder=None):
        super().__init__()
        self.c = c
        self.model = KimiModel(c)
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.mimo_output = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        self.whisper = [whisper_encoder]  # a list: not a submodule, so not in this state_dict

    @classmethod
    def from_release(cls, src: str | os.PathLike) -> "KimiReference":
        """Load a release folder (shards + whisper-large-v3/) as the official code does."""
        from safetensors.torch import load_file
        from transformers import WhisperModel

        src = Path(src)
        c = json.loads((src / "config.json").read_text())
        enc = WhisperModel.from_pretrained(str(src / WHISPER_DIR)).encoder.float().eval()
        ref = cls(c, enc)
        sd = {}
        for f in sorted(src.glob("model-*-of-*.safetensors")):
            sd.update(load_file(str(f)))
        sd = {k: v for k, v in sd.items() if not k.endswith("rotary_emb.inv_freq")}
        ref.load_state_dict(sd, strict=True)
        return ref.float().eval()

    # -- audio ---------------------------------------------------------------------------------------
    @torch.no_grad()
    def whisper_features(self, wave: np.ndarray) -> torch.Tensor:
        """['n_tokens 4*d'] for one clip (tokenize_waveform + the prompt manager's reshape)."""
        enc = self.whisper[0]
        out = []
        for start in range(0, len(wave), N_SAMPLES):
            seg = wave[start:start + N_SAMPLES]
            token_len = (len(seg) - 1) // (160 * 8) + 1
            mel = log_mel(seg, enc.config.num_mel_bins)[None]
            out.append(enc(mel).last_hidden_state[:, :token_len * 4])
        f = torch.cat(out, dim=1)
        return f.reshape(f.shape[1] // 4, f.shape[2] * 4)

    @torch.no_grad()
    def embed(self, audio_ids, text_ids, is_continuous, features: list[torch.Tensor]) -> torch.Tensor:
        """The fused input embeddings ['T D'] of one item (MoonshotKimiaModel.forward)."""
        m = self.model
        ids = torch.as_tensor(audio_ids)[None]
        mask = torch.as_tensor(is_continuous)[None]
        audio_emb = m.embed_tokens(ids)
        starts = (ids == MEDIA_BEGIN).nonzero()
        ends = (ids == MEDIA_END).nonzero()
        expanded = torch.zeros(ids.shape[1], features[0].shape[-1])
        for seg, ((_, s), (_, e)) in enumerate(zip(starts, ends)):
            n = e - (s + 1)
            expanded[s + 1:e] = features[seg][:n]
        whisper_emb = m.vq_adaptor(expanded[None]) * mask[:, :, None]
        fused = (audio_emb + whisper_emb) * torch.sqrt(torch.tensor(2.0))
        audio_emb = audio_emb * (~mask[:, :, None]) + fused * mask[:, :, None]
        return (audio_emb + m.embed_tokens(torch.as_tensor(text_ids)[None]))[0]

    # -- decoder -------------------------------------------------------------------------------------
    @torch.no_grad()
    def forward(self, embeds: torch.Tensor, attention_mask: torch.Tensor):
        """embeds ['B T D'] right-padded, attention_mask Bool['B T'] -> (norm(h), mimo_norm(branch))."""
        m = self.model
        b, t, _ = embeds.shape
        pos = torch.arange(t)[None].expand(b, t)
        cos_sin = m.rotary_emb(embeds, pos)
        causal = torch.tril(torch.ones(t, t, dtype=torch.bool))[None] & attention_mask[:, None, :]
        bias = torch.zeros(b, 1, t, t).masked_fill(~causal[:, None], torch.finfo(torch.float32).min)
        h, branch = embeds, None
        for i, layer in enumerate(m.layers):
            h = layer(h, attention_mask=bias, position_ids=pos, position_embeddings=cos_sin)
            if i == self.c["kimia_mimo_transformer_from_layer_index"]:
                branch = h.clone()
        for layer in m.mimo_layers:
            branch = layer(branch, attention_mask=bias, position_ids=pos, position_embeddings=cos_sin)
        return m.norm(h), m.mimo_norm(branch)

    @torch.no_grad()
    def layers(self, h: torch.Tensor, pos, start: int, end: int) -> torch.Tensor:
        """Decoder layers [start, end) over one unpadded sequence h ['T D'] at position ids pos ['T']
        (fractional after a pooling stage under `mean`), causal; the output before the final norm."""
        m = self.model
        x = h[None]
        cos_sin = m.rotary_emb(x, torch.as_tensor(pos, dtype=torch.float32)[None])
        t = x.shape[1]
        causal = torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]
        for layer in m.layers[start:end]:
            x = layer(x, attention_mask=causal, position_embeddings=cos_sin)
        return x[0]

    @torch.no_grad()
    def greedy(self, embeds: torch.Tensor, max_new: int, eos=(TEXT_EOS,)) -> tuple[list[int], float]:
        """kimia_infer's text generation (output_type="text") with greedy sampling, recomputed
        without a cache: after the prompt's fused embeddings ['T D'], each step takes the argmax of
        the text logits and feeds (audio stream: <|im_kimia_text_blank|>, text stream: the token),
        whose fused embedding is E(blank) + E(token), until an EOS id. Returns (tokens, EOS
        excluded; the smallest gap between the two best logits of any step)."""
        m = self.model
        x, out, gap = embeds, [], float("inf")
        for _ in range(max_new):
            logits = self.lm_head(m.norm(self.layers(x, torch.arange(len(x)), 0, len(m.layers))[-1]))
            top = torch.topk(logits, 2).values
            gap = min(gap, float(top[0] - top[1]))
            tok = int(logits.argmax())
            if tok in eos:
                break
            out.append(tok)
            step = m.embed_tokens(torch.tensor([TEXT_BLANK])) + m.embed_tokens(torch.tensor([tok]))
            x = torch.cat([x, step])
        return out, gap


# ----------------------------------------------------------------------------------------------
# A tiny random release


def _randomize_(module: nn.Module, g: torch.Generator, skip=()) -> None:
    """O(1) activations: Linear/conv weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2), norm weights
    1 + N(0, 0.1^2), embeddings ~ N(0, 0.5^2)."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if any(s in name for s in skip):
                continue
            noise = torch.randn(p.shape, generator=g)
            if "norm" in name and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif "embed" in name:
                p.copy_(0.5 * noise)
            else:
                fan_in = int(np.prod(p.shape[1:]))
                p.copy_(noise * fan_in ** -0.5)


def tiny_config(*, hidden=64, layers=3, mimo_layers=1, mimo_from=1, heads=4, kv_heads=2, intermediate=128,
                whisper_d=64, rope_theta=1e6) -> dict:
    """A config.json with the release's field names (MoonshotKimiaForCausalLM), tiny sizes."""
    return {
        "architectures": ["MoonshotKimiaForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_moonshot_kimia.KimiAudioConfig",
                     "AutoModelForCausalLM": "modeling_moonshot_kimia.MoonshotKimiaForCausalLM"},
        "model_type": "kimi_audio",
        "vocab_size": 168448, "hidden_size": hidden, "intermediate_size": intermediate,
        "num_hidden_layers": layers, "num_attention_heads": heads, "num_key_value_heads": kv_heads,
        "hidden_act": "silu", "rms_norm_eps": 1e-6, "rope_theta": rope_theta, "rope_scaling": None,
        "max_position_embeddings": 8192, "initializer_range": 0.02, "tie_word_embeddings": False,
        "use_cache": True, "bos_token_id": 151643, "eos_token_id": 151644, "pad_token_id": 152063,
        "kimia_mimo_layers": mimo_layers, "kimia_mimo_audiodelaytokens": 6,
        "kimia_mimo_transformer_from_layer_index": mimo_from, "kimia_audio_output_vocab": 16896,
        "kimia_text_output_vocab": 152064, "num_audio_special_tokens": 512, "num_base_tokens": 151643,
        "kimia_token_offset": TOKEN_OFFSET, "use_whisper_feature": True,
        "kimia_adaptor_input_dim": 4 * whisper_d, "kimia_media_begin": MEDIA_BEGIN, "kimia_media_end": MEDIA_END,
        "torch_dtype": "float32",
    }


def make_tiny_kimi_audio(dst: str | os.PathLike, *, seed: int = 0, whisper_layers: int = 2, **cfg_kw) -> Path:
    """Write a tiny random Kimi-Audio release to `dst`:

        config.json, model.safetensors.index.json,
        model-{k}-of-{n}.safetensors for k < n+1: one per decoder layer (model.layers.{i}.*, then
            model.mimo_layers.{i}.*, each with its self_attn.rotary_emb.inv_freq buffer), the
            adaptor (model.vq_adaptor.layers.{0,3,4}.*) in the first,
        model-{n+1}-of-{n+1}.safetensors: model.embed_tokens, model.norm, lm_head, mimo_output,
            model.mimo_norm,
        whisper-large-v3/: a WhisperForConditionalGeneration (128 mel bins, 30 s windows) with its
            preprocessor_config.json,
        tiktoken.model (the Qwen BPE, written from the Qwen2 tokenizer.json asset) and
            tokenizer_config.json.
    """
    from safetensors.torch import save_file
    from transformers import WhisperConfig, WhisperFeatureExtractor, WhisperForConditionalGeneration

    from affjax.data.assets import qwen2_tokenizer_json
    from affjax.models.kimi_audio.tokenizer import ranks_from_tokenizer_json, write_tiktoken

    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    c = tiny_config(**cfg_kw)
    whisper_d = c["kimia_adaptor_input_dim"] // 4
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)

    wcfg = WhisperConfig(num_mel_bins=128, d_model=whisper_d, encoder_layers=whisper_layers,
                         encoder_attention_heads=4, encoder_ffn_dim=2 * whisper_d, decoder_layers=1,
                         decoder_attention_heads=4, decoder_ffn_dim=2 * whisper_d, max_source_positions=1500,
                         vocab_size=51866, num_hidden_layers=whisper_layers)
    whisper = WhisperForConditionalGeneration(wcfg).eval()
    _randomize_(whisper, g, skip=("embed_positions",))
    whisper.save_pretrained(str(dst / WHISPER_DIR), safe_serialization=True)
    WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30,
                            n_fft=400, padding_value=0.0).save_pretrained(str(dst / WHISPER_DIR))

    ref = KimiReference(c)
    _randomize_(ref, g)
    sd = {k: v.contiguous() for k, v in ref.state_dict().items()}
    hd = c["hidden_size"] // c["num_attention_heads"]
    inv_freq = 1.0 / (c["rope_theta"] ** (torch.arange(0, hd, 2).float() / hd))
    last = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight", "mimo_output.weight",
            "model.mimo_norm.weight")
    groups = [f"model.layers.{i}." for i in range(c["num_hidden_layers"])] + \
             [f"model.mimo_layers.{i}." for i in range(c["kimia_mimo_layers"])]
    n = len(groups)
    shards: dict[str, dict] = {}
    for k, prefix in enumerate(groups):
        part = {key: v for key, v in sd.items() if key.startswith(prefix)}
        part[prefix + "self_attn.rotary_emb.inv_freq"] = inv_freq.clone()
        if k == 0:
            part.update({key: v for key, v in sd.items() if key.startswith("model.vq_adaptor.")})
        shards[f"model-{k + 1}-of-{n}.safetensors"] = part
    shards[f"model-{n + 1}-of-{n + 1}.safetensors"] = {key: sd[key] for key in last}
    weight_map, total = {}, 0
    for name, part in shards.items():
        save_file(part, str(dst / name), metadata={"format": "pt"})
        for key, v in part.items():
            weight_map[key] = name
            total += v.numel() * v.element_size()
    assert set(weight_map) >= set(sd), set(sd) - set(weight_map)
    (dst / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    (dst / "config.json").write_text(json.dumps(c, indent=2))
    write_tiktoken(ranks_from_tokenizer_json(qwen2_tokenizer_json()), dst / "tiktoken.model")
    (dst / "tokenizer_config.json").write_text(json.dumps({
        "auto_map": {"AutoTokenizer": ["tokenization_kimia.TikTokenTokenizer", None]},
        "tokenizer_class": "TikTokenTokenizer", "bos_token": "[BOS]", "eos_token": "[EOS]",
        "model_max_length": 1000000000000000019884624838656}, indent=2))
    return dst


def n_skipped_whisper_keys(src: str | os.PathLike) -> int:
    """Tensors of the release's Whisper folder outside its encoder."""
    from safetensors import safe_open

    with safe_open(str(Path(src) / WHISPER_DIR / "model.safetensors"), framework="pt") as f:
        return sum(1 for k in f.keys() if not k.startswith("model.encoder."))
