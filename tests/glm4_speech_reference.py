"""PyTorch reference of GLM-4-Voice's speech tokenizer (THUDM/GLM-4-Voice, speech_tokenizer/), the
discrete audio front end of Kimi-Audio, plus a tiny random checkpoint in its on-disk layout.

What the official code does, written out here for the configuration the real checkpoint
(THUDM/glm-4-voice-tokenizer) uses: `quantize_encoder_only`, `encoder_causal_convolution`,
bidirectional layers (`encoder_causal_attention` and `quantize_causal_encoder` false) under a
block-causal mask (`quantize_causal_block_size`), average pooling after layer `pooling_position`
and a nearest-code lookup after layer `quantize_position`. The encoder layers are transformers'
own WhisperEncoderLayer (the official WhisperVQEncoderLayer is that layer when not causal); the
causal convolutions, the block-causal mask, the pooling and the quantizer follow the official
`modeling_whisper.WhisperVQEncoder.forward`, and `extract_speech_token` follows
`speech_tokenizer/utils.py` (what Kimi-Audio's Glm4Tokenizer calls), on the CPU.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch import nn
from transformers import WhisperConfig, WhisperFeatureExtractor
from transformers.models.whisper.modeling_whisper import WhisperEncoderLayer

SAMPLE_RATE = 16000
SEGMENT_SECONDS = 30  # utils.extract_speech_token cuts audio into 30 s pieces
BATCH = 128  # ... and runs them through the feature extractor and the model 128 at a time


class CausalConv1d(nn.Conv1d):
    """The official causal convolution: no padding in the conv, dilation * (kernel - 1) zeros on the left."""

    def __init__(self, c_in: int, c_out: int, kernel_size: int, stride: int = 1):
        super().__init__(c_in, c_out, kernel_size, stride=stride, padding=0)
        self.left_padding = self.dilation[0] * (kernel_size - 1)

    def forward(self, x):
        return super().forward(nn.functional.pad(x, (self.left_padding, 0)))


def block_causal_mask(attention_mask: torch.Tensor, block_size: int | None) -> torch.Tensor:
    """Additive mask (B, 1, T, T): a query sees every earlier key and every key of its own block,
    never a padding key (official get_block_causal_attention_mask; padding only when block_size is None)."""
    b, t = attention_mask.shape
    if block_size is None:
        allowed = torch.ones(1, t, t, dtype=torch.bool)
    else:
        causal = torch.tril(torch.ones(1, t, t, dtype=torch.bool))
        blocks = [causal.new_ones((min(s + block_size, t) - s,) * 2) for s in range(0, t, block_size)]
        allowed = causal | torch.block_diag(*blocks)
    allowed = allowed & attention_mask.bool()[:, None, :]
    return ((1.0 - allowed.float()) * torch.finfo(torch.float32).min).unsqueeze(1)


def vector_quantize(hidden: torch.Tensor, codebook: torch.Tensor):
    """Official distance: |x|^2 + |c|^2 - 2 x.c with addmm, argmin over the codebook -> (ids, distances)."""
    flat = hidden.reshape(-1, codebook.shape[1])
    distances = torch.addmm(codebook.pow(2).sum(1) + flat.pow(2).sum(1, keepdim=True), flat, codebook.t(),
                            alpha=-2.0, beta=1.0)
    return distances.argmin(1).reshape(hidden.shape[:2]), distances.reshape(*hidden.shape[:2], -1)


class GLM4SpeechTokenizerRef(nn.Module):
    """WhisperVQEncoder as loaded by the tokenizer (quantize_encoder_only: quantize_position layers)."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = config
        if config["pooling_type"] != "avg" or not config["encoder_causal_convolution"] or \
                config["encoder_causal_attention"] or config["quantize_causal_encoder"]:
            raise ValueError("the reference covers the real tokenizer's settings only")
        d = config["d_model"]
        wcfg = WhisperConfig(d_model=d, encoder_attention_heads=config["encoder_attention_heads"],
                             encoder_ffn_dim=config["encoder_ffn_dim"], num_mel_bins=config["num_mel_bins"],
                             activation_function=config["activation_function"])
        wcfg._attn_implementation = "eager"
        k = config["pooling_kernel_size"]
        self.conv1 = CausalConv1d(config["num_mel_bins"], d, 3)
        self.conv2 = CausalConv1d(d, d, 3, stride=2)
        self.embed_positions = nn.Embedding(config["max_source_positions"], d)
        self.layers = nn.ModuleList([WhisperEncoderLayer(wcfg) for _ in range(config["quantize_position"])])
        self.pooling_layer = nn.AvgPool1d(k)
        self.codebook = nn.Embedding(config["quantize_vocab_size"], d)
        # used by layers after the quantizer only (none in the tokenizer), kept for the on-disk layout
        self.embed_positions2 = nn.Embedding(math.ceil(config["max_source_positions"] / k), d)
        # EMA buffers of the training-time codebook update (quantize_ema_decay is set): saved, unused
        self.register_buffer("ema_count", torch.ones(config["quantize_vocab_size"]))
        self.register_buffer("ema_weight", self.codebook.weight.detach().clone())

    @torch.no_grad()
    def forward(self, input_features: torch.Tensor, attention_mask: torch.Tensor):
        """input_features (B, n_mels, F), attention_mask (B, F) as the feature extractor gives them
        -> (codes (B, N), pre-quantizer hidden states (B, N, D), code distances (B, N, V))."""
        c = self.config
        k, block = c["pooling_kernel_size"], c["quantize_causal_block_size"]
        stride = self.conv1.stride[0] * self.conv2.stride[0]
        mask = attention_mask[:, ::stride]
        x = nn.functional.gelu(self.conv1(input_features))
        x = nn.functional.gelu(self.conv2(x)).permute(0, 2, 1)
        x = x + self.embed_positions.weight[: input_features.shape[-1] // stride]
        bias = block_causal_mask(mask, block)
        codes = distances = None
        for idx, layer in enumerate(self.layers):
            x = layer(x, bias)
            if idx + 1 == c["pooling_position"]:
                x = x.permute(0, 2, 1)
                if x.shape[-1] % k:
                    x = nn.functional.pad(x, (0, k - x.shape[-1] % k))
                x = self.pooling_layer(x).permute(0, 2, 1)
                mask = mask[:, ::k]
                bias = block_causal_mask(mask, None if block is None else block // k)
            if idx + 1 == c["quantize_position"]:
                codes, distances = vector_quantize(x, self.codebook.weight)
        return codes, x, distances


def load_reference(src: str | Path) -> GLM4SpeechTokenizerRef:
    """The reference from a tokenizer folder (config.json + model.safetensors), every tensor used."""
    from safetensors.torch import load_file

    src = Path(src)
    model = GLM4SpeechTokenizerRef(json.loads((src / "config.json").read_text()))
    model.load_state_dict(load_file(str(src / "model.safetensors")), strict=True)
    return model.eval()


def segments(wave: np.ndarray) -> list[np.ndarray]:
    """The official split: consecutive 30 s pieces, the last one shorter."""
    step = SEGMENT_SECONDS * SAMPLE_RATE
    return [wave[s:s + step] for s in range(0, len(wave), step)]


def extract_speech_token(model: GLM4SpeechTokenizerRef, fe: WhisperFeatureExtractor, waves, *, details=None):
    """utils.extract_speech_token on 16 kHz numpy waveforms -> one list of codes per waveform.

    details: a list that receives (segment index, owner, input_features, attention_mask, codes,
    hidden, distances) per segment, for tests that compare more than the codes."""
    pieces = [(i, s) for i, w in enumerate(waves) for s in segments(np.asarray(w, np.float32))]
    stride = model.conv1.stride[0] * model.conv2.stride[0] * (model.config["pooling_kernel_size"] or 1) * fe.hop_length
    out = [[] for _ in waves]
    for start in range(0, len(pieces), BATCH):
        batch = pieces[start:start + BATCH]
        feats = fe([s for _, s in batch], sampling_rate=SAMPLE_RATE, return_attention_mask=True, return_tensors="pt",
                   padding="longest", pad_to_multiple_of=stride)
        codes, hidden, distances = model(feats.input_features, feats.attention_mask)
        mask = feats.attention_mask[:, ::model.conv1.stride[0] * model.conv2.stride[0]]
        mask = mask[:, ::model.config["pooling_kernel_size"]]
        assert mask.shape == codes.shape
        for j, (owner, _) in enumerate(batch):
            valid = mask[j].bool()
            out[owner].extend(codes[j][valid].tolist())
            if details is not None:
                details.append((start + j, owner, feats.input_features[j].numpy(), feats.attention_mask[j].numpy(),
                                codes[j][valid].numpy(), hidden[j][valid].numpy(), distances[j][valid].numpy()))
    return out


# ----------------------------------------------------------------------------------------------
# tiny random checkpoint in the real layout


def tiny_config(**overrides) -> dict:
    """config.json of THUDM/glm-4-voice-tokenizer (every field it has), at tiny widths: d_model 64,
    4 heads, 2 tokenizer layers of 4, pooling after layer 1 (so a pooled layer runs under the pooled
    block mask; the real one pools after its last tokenizer layer, 16), blocks of 40 frames (0.8 s;
    10 codes after pooling) instead of 200 (4 s), 256 codes."""
    c = {
        "_name_or_path": "tiny-glm-4-voice-tokenizer", "activation_dropout": 0.0, "activation_function": "gelu",
        "apply_spec_augment": False, "architectures": ["WhisperVQEncoder"], "attention_dropout": 0.0,
        "begin_suppress_tokens": [220, 50257], "bos_token_id": 50257, "classifier_proj_size": 256,
        "d_model": 64, "decoder_attention_heads": 4, "decoder_ffn_dim": 128, "decoder_layerdrop": 0.0,
        "decoder_layers": 2, "decoder_start_token_id": 50258, "dropout": 0.0, "encoder_attention_heads": 4,
        "encoder_causal_attention": False, "encoder_causal_convolution": True, "encoder_ffn_dim": 128,
        "encoder_layerdrop": 0.0, "encoder_layers": 4, "eos_token_id": 50257, "init_std": 0.02,
        "is_encoder_decoder": True, "mask_feature_length": 10, "mask_feature_min_masks": 0,
        "mask_feature_prob": 0.0, "mask_time_length": 10, "mask_time_min_masks": 2, "mask_time_prob": 0.05,
        "max_length": 448, "max_source_positions": 1500, "max_target_positions": 448, "median_filter_width": 7,
        "model_type": "whisper", "num_hidden_layers": 4, "num_mel_bins": 128, "pad_token_id": 50256,
        "pooling_kernel_size": 4, "pooling_position": 1, "pooling_type": "avg", "quantize_causal_block_size": 40,
        "quantize_causal_encoder": False, "quantize_commit_coefficient": 0.25, "quantize_ema_decay": 0.99,
        "quantize_encoder_only": True, "quantize_loss_scale": 10.0, "quantize_position": 2,
        "quantize_restart_interval": 100, "quantize_vocab_size": 256, "scale_embedding": False,
        "skip_language_detection": True, "torch_dtype": "float32", "transformers_version": "4.44.1",
        "use_cache": True, "use_weighted_layer_sum": False, "vocab_size": 51866,
    }
    c.update(overrides)
    return c


def make_tiny_glm4_speech_tokenizer(dst_dir: str | Path, *, seed: int = 0, **overrides) -> Path:
    """Write config.json, model.safetensors (the official key names, no prefix: conv1.*, conv2.*,
    embed_positions.weight, layers.{i}.*, codebook.weight, embed_positions2.weight, ema_count,
    ema_weight) and preprocessor_config.json (WhisperFeatureExtractor, 128 mel bins) to dst_dir.

    Weights keep PyTorch's default initialisation (attention far from uniform, so the mask matters)
    with non-zero LayerNorm parameters; the codebook is made of pre-quantizer states of a calibration
    clip plus noise, so the codes spread over the codebook as a trained one's would."""
    from safetensors.torch import save_file

    from affjax.testing import synth_speech_like

    dst = Path(dst_dir)
    dst.mkdir(parents=True, exist_ok=True)
    config = tiny_config(**overrides)
    torch.manual_seed(seed)
    model = GLM4SpeechTokenizerRef(config).eval()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
        model.embed_positions.weight.mul_(0.5)
        model.embed_positions2.weight.copy_(model.embed_positions.weight[: model.embed_positions2.num_embeddings])
    fe = WhisperFeatureExtractor(feature_size=config["num_mel_bins"], sampling_rate=SAMPLE_RATE, hop_length=160,
                                 chunk_length=SEGMENT_SECONDS, n_fft=400, padding_value=0.0)
    feats = fe([synth_speech_like(8.0, seed=seed + 1000)], sampling_rate=SAMPLE_RATE, return_attention_mask=True,
               return_tensors="pt", padding="longest", pad_to_multiple_of=1280)
    _, hidden, _ = model(feats.input_features, feats.attention_mask)
    hidden = hidden.reshape(-1, hidden.shape[-1])
    pick = torch.randint(0, hidden.shape[0], (config["quantize_vocab_size"],), generator=g)
    with torch.no_grad():
        model.codebook.weight.copy_(hidden[pick] + 0.3 * hidden.std() * torch.randn(hidden[pick].shape, generator=g))
        model.ema_weight.copy_(model.codebook.weight)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(dst / "model.safetensors"),
              metadata={"format": "pt"})
    (dst / "config.json").write_text(json.dumps(config, indent=2))
    fe.save_pretrained(str(dst))
    return dst
