"""Memory plans from abstract shapes: what a model needs before any weight is read.

The model is built with `nnx.eval_shape` (no memory), so the parameter count comes from the very
modules that will run, not from a formula that could drift from them. Around it this module adds
plain arithmetic: parameter bytes per dtype, the KV cache for a (batch, length), a rough prefill
activation peak, and per-chip bytes on TPU meshes (data, model) with model-parallel sharding.
Per-chip parameter bytes follow affjax.runtime.sharding's own rules (the table that places the weights when
a checkpoint is restored onto a mesh), so the plan and a run agree on what each chip holds.

`plan(...)` returns a dict (JSON-friendly), `format_plan(...)` renders it; `affjax plan` on the
command line prints both for a grid of batches and lengths. The assumptions behind every estimate
travel in the result under "assumptions".
"""

from __future__ import annotations

import copy
import functools
import json
import math
import sys
from pathlib import Path

from flax import nnx
from jax.sharding import AbstractMesh

from affjax.models.kimi_audio.modeling import ARCHITECTURE as KIMI_ARCHITECTURE
from affjax.models.kimi_audio.modeling import AUDIO_WINDOWS_PER_STEP
from affjax.models.kimi_audio.modeling import MODEL_TYPES as KIMI_MODEL_TYPES
from affjax.models.kimi_audio.modeling import KimiAudio, KimiAudioConfig
from affjax.models.layers import abstract_module, row_steps
from affjax.models.qwen2.modeling import Qwen2ForCausalLM, TextConfig
from affjax.models.qwen2_audio.modeling import Qwen2Audio, Qwen2AudioConfig
from affjax.runtime.aot import CHIPS
from affjax.runtime.sharding import AXES, param_spec

GiB = 1 << 30
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
HEADROOM = 0.2  # a mesh fits when the per-chip total stays under (1 - HEADROOM) x HBM

# chips per slice and HBM per chip (bytes)
TOPOLOGIES: dict[str, dict] = {
    "v4-8": {"chips": 4, "hbm": CHIPS["v4"]["hbm"]},
    "v5e-8": {"chips": 8, "hbm": CHIPS["v5e"]["hbm"]},
    "v5p-8": {"chips": 4, "hbm": CHIPS["v5p"]["hbm"]},
}

# The geometry of the public Qwen2-Audio-7B config.json, in that file's form.
QWEN2_AUDIO_7B_CONFIG: dict = {
    "model_type": "qwen2_audio",
    "architectures": ["Qwen2AudioForConditionalGeneration"],
    "audio_token_index": 151646,
    "ignore_index": -100,
    "vocab_size": 156032,
    "audio_config": {
        "model_type": "qwen2_audio_encoder",
        "num_mel_bins": 128,
        "d_model": 1280,
        "encoder_layers": 32,
        "encoder_attention_heads": 20,
        "encoder_ffn_dim": 5120,
        "max_source_positions": 1500,
        "activation_function": "gelu",
        "scale_embedding": False,
    },
    "text_config": {
        "model_type": "qwen2",
        "vocab_size": 156032,
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 32,
        "intermediate_size": 11008,
        "hidden_act": "silu",
        "rope_theta": 10000.0,
        "rms_norm_eps": 1e-5,
        "max_position_embeddings": 8192,
        "tie_word_embeddings": False,
        "use_sliding_window": False,
    },
}


# openai/whisper-large-v3's config.json (the `whisper-large-v3/` folder of the Kimi-Audio release), in
# that file's form: the geometry and the ids; dropout, spec-augment and generation fields left out.
# Verified: the geometry against two public copies of the file's values and against the release's
# whisper-large-v3/model.safetensors (3,087,131,376 bytes = 1,543,490,560 float16 parameters of
# exactly this geometry, decoder included, plus a 150,256-byte header).
WHISPER_LARGE_V3_CONFIG: dict = {
    "model_type": "whisper",
    "architectures": ["WhisperForConditionalGeneration"],
    "vocab_size": 51866,
    "num_mel_bins": 128,
    "d_model": 1280,
    "encoder_layers": 32,
    "encoder_attention_heads": 20,
    "encoder_ffn_dim": 5120,
    "decoder_layers": 32,
    "decoder_attention_heads": 20,
    "decoder_ffn_dim": 5120,
    "max_source_positions": 1500,
    "max_target_positions": 448,
    "activation_function": "gelu",
    "scale_embedding": False,
    "bos_token_id": 50257,
    "eos_token_id": 50257,
    "pad_token_id": 50256,
    "decoder_start_token_id": 50258,
    "torch_dtype": "float16",
}

# moonshotai/Kimi-Audio-7B-Instruct's config.json (MoonshotKimiaForCausalLM), in that file's form,
# with whisper-large-v3/config.json embedded as "whisper_config" as the converter does
# (affjax.models.kimi_audio.params.read_config).
# Verified (an inspector of the release, HF revision 9a82a84c, checks these exact values of its
# config.json): architectures, hidden_size, intermediate_size, num_hidden_layers,
# num_attention_heads, num_key_value_heads, max_position_embeddings, vocab_size, kimia_mimo_layers,
# kimia_mimo_transformer_from_layer_index, kimia_audio_output_vocab, kimia_text_output_vocab,
# kimia_token_offset, kimia_mimo_audiodelaytokens, kimia_adaptor_input_dim, torch_dtype. The same
# inspector's model.safetensors.index.json total_size, 19,532,673,280 bytes in 453 tensors, is
# exactly the bfloat16 size of this geometry: 9,766,334,464 parameters (untied lm_head and
# mimo_output) plus 34 RoPE inv_freq buffers of 64.
# From secondary sources (the remote code's configuration class defaults, vLLM's Kimi-Audio
# constants "from the Kimi-Audio-7B-Instruct config", and this repository's prompt streams):
# model_type, rms_norm_eps 1e-6, kimia_media_begin 151661 / kimia_media_end 151663,
# use_whisper_feature, num_audio_special_tokens, num_base_tokens.
# Assumed (not seen in any copy): rope_theta 1e6 (that of Qwen2.5-7B, the model Kimi-Audio starts
# from), hidden_act silu, tie_word_embeddings false (the release stores lm_head.weight on its own),
# no sliding window. None of the assumed values changes a memory plan.
KIMI_AUDIO_7B_CONFIG: dict = {
    "model_type": "moonshot_kimia",
    "architectures": [KIMI_ARCHITECTURE],
    "vocab_size": 168448,
    "hidden_size": 3584,
    "intermediate_size": 18944,
    "num_hidden_layers": 28,
    "num_attention_heads": 28,
    "num_key_value_heads": 4,
    "hidden_act": "silu",
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "max_position_embeddings": 8192,
    "tie_word_embeddings": False,
    "use_sliding_window": False,
    "torch_dtype": "bfloat16",
    "kimia_mimo_layers": 6,
    "kimia_mimo_audiodelaytokens": 6,
    "kimia_mimo_transformer_from_layer_index": 21,
    "kimia_audio_output_vocab": 16896,
    "kimia_text_output_vocab": 152064,
    "num_audio_special_tokens": 512,
    "num_base_tokens": 151643,
    "kimia_token_offset": 152064,
    "use_whisper_feature": True,
    "kimia_adaptor_input_dim": 5120,
    "kimia_media_begin": 151661,
    "kimia_media_end": 151663,
    "whisper_config": WHISPER_LARGE_V3_CONFIG,
}

MEL_FRAMES_PER_SECOND = 100  # 16 kHz audio, hop 160: an encoder window of 3000 mel frames is 30 s


def tiny_config() -> dict:
    """Qwen2-Audio-7B's config with tiny widths and depths (same vocabulary, mel bins and 30 s
    window): `--ckpt-config qwen2-audio-tiny`, for quick plans and the TPU compile tests."""
    cfg = copy.deepcopy(QWEN2_AUDIO_7B_CONFIG)
    cfg["audio_config"].update(d_model=64, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=128)
    cfg["text_config"].update(hidden_size=64, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                              intermediate_size=128)
    return cfg


ASSUMPTIONS = [
    "parameters: counted from the model built with nnx.eval_shape; bytes = count x dtype size, "
    "every parameter in the plan's dtype",
    "KV cache: 2 (K and V) x layers x batch x length x kv_heads x head_dim x dtype size, in the "
    "compute dtype; length is the whole prompt (text plus audio tokens) plus any generated tokens",
    "prefill activations: one layer's temporaries at a time (inference, layers run in sequence); "
    "explicit attention keeps float32 logits and float32 probabilities (2 x B x H x T x T x 4 bytes); "
    "the SwiGLU MLP keeps gate, up and their product (3 x B x T x intermediate); the residual stream "
    "and its normed copy (2 x B x T x hidden); q, k, v and the attention output",
    "LM head: float32 logits for the last position only (B x vocab x 4), as generation uses them",
    "XLA fusion usually removes some temporaries and may add workspace: treat activations as an "
    "order-of-magnitude estimate; parameters and KV cache are exact",
    "meshes (data, model): parameters per chip by affjax.runtime.sharding's rules (attention heads, MLP "
    "width and vocabulary over 'model'; norms, output biases, conv stem, position tables, projector "
    "and any block whose head count the model axis does not divide, e.g. the 20-head audio "
    "encoder's attention at model=8, whole on every chip); KV cache sharded over 'model' (KV heads) and 'data' "
    "(batch rows, ceil(batch / data) per chip); activations: attention, MLP intermediate and "
    "head logits split over 'model', residual replicated over it; audio-encoder attention is "
    "replicated when its head count is not divisible by the model axis",
    f"a mesh fits when the per-chip total <= {1 - HEADROOM:.0%} of HBM ({HEADROOM:.0%} headroom for "
    "the compiler, fragmentation and runtime buffers); the model axis must divide the decoder's "
    "query and KV head counts",
]

# Appended for the model family the plan is for (the audio formulas differ: see audio_span).
FAMILY_ASSUMPTIONS: dict[str, list[str]] = {
    "qwen2_audio": [
        "audio (qwen2_audio): one 30 s clip per batch row, max_source_positions frames after the conv "
        "stem; the encoder runs before the decoder, so the activation peak is the larger of the two, "
        "plus the projected audio tokens kept for the decoder",
    ],
    "kimi_audio": [
        "audio (kimi_audio): audio of N seconds per row is ceil(N / 30) windows of 30 s, all through the "
        "encoder together, each whole (3000 mel frames, 1500 frames out, as the official code); 4 frames "
        "stack into one 12.5 Hz token (375 per window, fewer for the last window's valid frames) and "
        "every token is one decoder position (no pooling: 30 s = 375 positions); the activation peak is "
        "the larger of encoder (or adaptor) and decoder, plus the adaptor outputs (375 per window) kept "
        "for the decoder",
        "kimi_audio: the MIMO layers, mimo_norm and mimo_output are loaded (counted in the parameters) "
        "but run only for audio output: the text path's KV cache and activations cover the "
        "num_hidden_layers text layers only; mimo_output is sharded over the vocabulary like lm_head",
    ],
}


# ----------------------------------------------------------------------------------------------
# Building the model abstractly


def _family(hf_config: dict) -> str | None:
    """The model family plan knows a config as: kimi_audio by its architecture (the release's
    model_type is not relied on), else the config's model_type."""
    if KIMI_ARCHITECTURE in (hf_config.get("architectures") or ()) or hf_config.get("model_type") in KIMI_MODEL_TYPES:
        return "kimi_audio"
    return hf_config.get("model_type")


def _configs(hf_config: dict):
    """(model family, audio EncoderConfig or None, TextConfig, builder) for an HF config dict."""
    mt = _family(hf_config)
    if mt == "kimi_audio":
        cfg = KimiAudioConfig.from_hf(hf_config)
        return mt, cfg.audio, cfg.text, lambda rngs: KimiAudio(cfg, rngs=rngs)
    if mt == "qwen2_audio":
        cfg = Qwen2AudioConfig.from_hf(hf_config)
        return mt, cfg.audio, cfg.text, lambda rngs: Qwen2Audio(cfg, rngs=rngs)
    if mt in ("qwen2", "llama"):
        cfg = TextConfig.from_hf(hf_config)
        return mt, None, cfg, lambda rngs: Qwen2ForCausalLM(cfg, rngs=rngs)
    raise ValueError(f"model_type {mt!r}: plan knows qwen2_audio, kimi_audio ({KIMI_ARCHITECTURE}), qwen2 and llama")


def _part(path: tuple) -> str:
    if path[0] == "audio_tower":
        return "audio_tower"
    if path[0] in ("multi_modal_projector", "vq_adaptor"):
        return "projector"
    if path[0] in ("mimo_layers", "mimo_norm"):
        return "mimo_layers"
    if path[0] == "mimo_output":
        return "mimo_output"
    if path[0] == "language_model":
        path = path[1:]
    if path[0] == "embed_tokens":
        return "embeddings"
    if path[0] == "lm_head":
        return "lm_head"
    return "language_model"


@functools.lru_cache(maxsize=16)
def _param_shapes(config_json: str) -> tuple[tuple[tuple, tuple[int, ...]], ...]:
    """(path, shape) of every parameter of the abstractly built model."""
    _, _, _, build = _configs(json.loads(config_json))
    abstract = abstract_module(build)
    return tuple((tuple(path), tuple(leaf.shape)) for path, leaf in nnx.to_flat_state(nnx.state(abstract, nnx.Param)))


@functools.lru_cache(maxsize=16)
def _param_counts(config_json: str) -> tuple[tuple[str, int], ...]:
    counts = {"audio_tower": 0, "projector": 0, "language_model": 0, "embeddings": 0, "lm_head": 0,
              "mimo_layers": 0, "mimo_output": 0}
    for path, shape in _param_shapes(config_json):
        counts[_part(path)] += math.prod(shape)
    return tuple(counts.items())


@functools.lru_cache(maxsize=64)
def _param_elements_per_chip(config_json: str, model: int) -> int:
    cfg = _model_config(json.loads(config_json))
    mesh = AbstractMesh((1, model), AXES)
    total = 0
    for path, shape in _param_shapes(config_json):
        split = math.prod(mesh.shape[a] for a in param_spec(path, shape, mesh, cfg) if a is not None)
        total += -(-math.prod(shape) // split)
    return total


def _model_config(hf_config: dict):
    mt = _family(hf_config)
    if mt == "kimi_audio":
        return KimiAudioConfig.from_hf(hf_config)
    if mt == "qwen2_audio":
        return Qwen2AudioConfig.from_hf(hf_config)
    return TextConfig.from_hf(hf_config)


def param_bytes_per_chip(hf_config: dict, *, model: int, dtype_bytes: int) -> int:
    """Parameter bytes one chip holds on a mesh with `model` chips on the model axis, placed by
    affjax.runtime.sharding's rules (what `sharding.load` restores onto each chip)."""
    return _param_elements_per_chip(json.dumps(hf_config, sort_keys=True), model) * dtype_bytes


def param_counts(hf_config: dict) -> dict[str, int]:
    """Parameters per part (audio_tower, projector = Qwen2-Audio's projector or Kimi's vq_adaptor,
    language_model = decoder layers and final norm, embeddings, lm_head, mimo_layers = Kimi's MIMO
    layers and mimo_norm, mimo_output; 0 where absent) plus "total", from the abstractly built model."""
    counts = dict(_param_counts(json.dumps(hf_config, sort_keys=True)))
    counts["total"] = sum(counts.values())
    return counts


# ----------------------------------------------------------------------------------------------
# Arithmetic


def kv_cache_bytes(text, *, batch: int, length: int, dtype_bytes: int) -> int:
    """2 x layers x batch x length x kv_heads x head_dim x bytes (text: a TextConfig)."""
    return 2 * text.layers * batch * length * text.kv_heads * text.head_dim * dtype_bytes


def _decoder_activations(t, *, batch: int, seq_len: int, nbytes: int, model: int = 1) -> dict[str, int]:
    b, n = batch, seq_len
    residual = 2 * b * n * t.hidden * nbytes
    qkvo = b * n * (2 * t.heads + 2 * t.kv_heads) * t.head_dim * nbytes // model
    attn = 2 * b * t.heads * n * n * 4 // model
    mlp = 3 * b * n * t.intermediate * nbytes // model
    head = b * t.vocab_size * 4 // model
    layer = residual + max(qkvo + attn, mlp)
    return {"residual": residual, "attention": qkvo + attn, "mlp": mlp, "head_logits": head,
            "peak": max(layer, residual + head)}


def _encoder_activations(a, t, *, clips: int, tokens_per_clip: int, adaptor_in: int = 0, nbytes: int,
                         model: int = 1) -> dict[str, int]:
    """One pass of the audio encoder over `clips` windows (all together), then the projector /
    adaptor: `tokens_per_clip` audio tokens of each kept for the decoder. adaptor_in > 0 (Kimi): the
    stacked frames (adaptor_in wide) and the adaptor's first output, split over 'model'."""
    f = a.max_source_positions
    d = a.d_model
    stem = clips * (a.num_mel_bins + d) * 2 * f * nbytes  # mel input + conv1 output at 2f frames
    residual = 2 * clips * f * d * nbytes
    attn_split = model if a.heads % model == 0 else 1
    attn = 2 * clips * a.heads * f * f * 4 // attn_split + 4 * clips * f * d * nbytes // attn_split
    mlp = clips * f * a.ffn_dim * nbytes // model
    adaptor = clips * tokens_per_clip * (adaptor_in + t.hidden // model) * nbytes if adaptor_in else 0
    out = clips * tokens_per_clip * t.hidden * nbytes  # projected audio tokens, kept for the decoder
    return {"stem": stem, "residual": residual, "attention": attn, "mlp": mlp, "adaptor": adaptor,
            "audio_tokens": out, "peak": max(stem, residual + max(attn, mlp), adaptor) + out}


def _activations(audio, text, *, batch: int, seq_len: int, nbytes: int, model: int = 1,
                 span: dict | None = None) -> dict:
    """Prefill activation peak; span (audio_span's) sizes the encoder: batch x windows clips."""
    dec = _decoder_activations(text, batch=batch, seq_len=seq_len, nbytes=nbytes, model=model)
    out = {"decoder": dec, "peak": dec["peak"]}
    if audio is not None:
        span = span or {"windows": 1, "tokens_per_window": audio.out_frames, "adaptor_input_dim": 0}
        enc = _encoder_activations(audio, text, clips=batch * span["windows"],
                                   tokens_per_clip=span["tokens_per_window"],
                                   adaptor_in=span["adaptor_input_dim"], nbytes=nbytes, model=model)
        out["encoder"] = enc
        out["peak"] = max(enc["peak"], dec["peak"] + enc["audio_tokens"])
    return out


# ----------------------------------------------------------------------------------------------
# Per program: what one chip holds beyond the parameters, checked against the TPU compiler


SEQ_SIDE_BYTES = 17  # per position, the running state's side arrays: valid (1), pos, size, span, slot_of (4 each)


def _split(n: int, model: int) -> int:
    """Heads (or widths) per chip: split over 'model' when it divides them, else whole (sharding's rule)."""
    return n // model if n % model == 0 else n


# float32 copies of its input a pooling stage holds at its peak on TPU: the compiler's buffer
# information shows three input-sized float32 buffers live at pool@0's peak (Qwen2-Audio-7B, v5e);
# its totals fit two to three over the stages and topologies compiled (docs/tpu.md)
POOL_F32_COPIES = 2.5


def program_bytes(hf_config: dict, layout: dict, *, batch: int, data: int, model: int, dtype: str = "bfloat16",
                  extra: int = 0, score_tokens: int = 0) -> dict[str, int]:
    """Per-chip bytes each program of a job holds beyond the parameters it reads (its inputs,
    outputs, caches and largest temporaries), by arithmetic: {label: bytes}, the labels of
    affjax.runtime.aot. `layout` is aot.job_layout's (groups, sequence and stage buffers, windows);
    rows go over 'data' when it divides the batch (else every chip holds all), heads, MLP width and
    vocabulary over 'model'. What the TPU compiler showed (affjax plan --aot), and these formulas keep:
    attention keeps its float32 scores once (the softmax and the value product fuse into them, no
    probability copy); the SwiGLU MLP keeps gate and up; norms write one normed copy; the pooling
    stage holds POOL_F32_COPIES float32 copies of its input; the head's row gather copies
    the sequence; the decode loop holds the prefill's caches and its carried copy of them, plus one
    step's logits."""
    cfg = _model_config(hf_config)
    a, t = cfg.audio, cfg.text
    nb = DTYPE_BYTES[dtype]
    b = -(-batch // data) if batch % data == 0 else batch
    w = layout["windows"] // data if layout["windows"] % data == 0 else layout["windows"]
    nh, kvh, inter = _split(t.heads, model), _split(t.kv_heads, model), _split(t.intermediate, model)
    vocab = _split(t.vocab_size, model)

    def seq(n):  # the running state of n positions: hidden states + side arrays
        return b * n * (t.hidden * nb + SEQ_SIDE_BYTES)

    def kv(n, slots):  # K and V of n layers
        return 2 * n * b * slots * kvh * t.head_dim * nb

    def layer(n):  # one decoder layer's largest temporaries over n positions
        attn = b * n * (nh + 2 * kvh) * t.head_dim * nb + b * nh * n * n * 4
        mlp = 2 * b * n * inter * nb
        return b * n * t.hidden * nb + max(attn, mlp)

    # embed: the audio encoder over w windows of f frames (Kimi-Audio's we at a time: its encoder
    # steps through many windows, KimiAudio.encode_audio), then the model's input sequence
    adaptor = getattr(cfg, "adaptor_input_dim", 0)
    we = w // row_steps(w, AUDIO_WINDOWS_PER_STEP) if adaptor else w
    f, d, ah = a.max_source_positions, a.d_model, _split(a.heads, model)
    stem = we * a.num_mel_bins * a.mel_frames * 4 + we * d * a.mel_frames * nb  # float32 mel, conv1 output
    enc = we * f * d * nb + max(we * ah * f * f * 4 + 3 * we * f * ah * (d // a.heads) * nb,
                                2 * we * f * _split(a.ffn_dim, model) * nb)
    if adaptor:  # Kimi-Audio: stacked frames and the adaptor's first output, then every window's output
        # three times: as the loop stacks it, back in row order, masked past each window's tokens
        enc = (max(enc, we * cfg.tokens_per_window * (adaptor + _split(t.hidden, model)) * nb)
               + 3 * w * cfg.tokens_per_window * t.hidden * nb)
    T = layout["sequence_buffer"]
    out = {"embed": max(stem, enc) + seq(T)}
    buffers = [T] + list(layout["stage_buffers"])
    slots = (lambda n: n + extra) if not score_tokens else (lambda n: 0)
    for g, (lo, hi) in enumerate(layout["groups"]):
        n = buffers[g]
        if g > 0:
            prev = buffers[g - 1]
            out[f"pool@{lo}"] = seq(prev) + seq(n) + int(POOL_F32_COPIES * b * prev * t.hidden * 4)
        if hi > lo:
            out[f"layers[{lo}:{hi})"] = 2 * seq(n) + kv(hi - lo, slots(n)) + layer(n)
    last = buffers[-1]
    logits = b * vocab * 4
    if score_tokens:
        from affjax.runtime import shapes
        k = shapes.bucket(score_tokens, shapes.CONT_BUCKETS, "continuation")
        out["score_head"] = 2 * seq(last) + 2 * b * k * vocab * 4
    else:
        out["last_head"] = 2 * seq(last) + logits
        caches = sum(kv(hi - lo, buffers[g] + extra) for g, (lo, hi) in enumerate(layout["groups"]))
        out["decode"] = 2 * caches + 2 * logits + b * extra * 4
    return out


def audio_span(hf_config: dict, seconds: float | None = None) -> dict | None:
    """What `seconds` of audio (one batch row's; None: one full window, 30 s) becomes: {"seconds" (as
    the model takes them: Qwen2-Audio cuts at 30 s), "windows" (encoder windows run),
    "tokens_per_window" (audio tokens of a full window, all kept for the decoder), "positions"
    (decoder positions the audio takes), "adaptor_input_dim"}; None for a text-only model. The
    model-family switch of the audio formulas:

    - qwen2_audio: one clip cut at 30 s; conv stride 2 then average pool 2: 30 s = 750 positions.
    - kimi_audio: ceil(N / 30) consecutive 30 s windows, 4 encoder frames per 12.5 Hz token, one
      decoder position per token (no pooling): 375 per full window, 60 s = 750 positions.
    """
    fam = _family(hf_config)
    if fam not in ("qwen2_audio", "kimi_audio"):
        return None
    cfg = _model_config(hf_config)
    window = cfg.audio.mel_frames  # 3000 mel frames: 30 s
    if seconds is not None and not seconds > 0:
        raise ValueError(f"audio seconds must be > 0, got {seconds}")
    # mel frames of the audio: ceil(samples / hop) at 16 kHz, hop 160
    frames = window if seconds is None else max(1, -(-round(seconds * 16000) // (16000 // MEL_FRAMES_PER_SECOND)))
    if fam == "kimi_audio":
        windows = -(-frames // window)
        positions = (windows - 1) * cfg.window_tokens(window) + cfg.window_tokens(frames - (windows - 1) * window)
        return {"seconds": frames / MEL_FRAMES_PER_SECOND, "windows": windows,
                "tokens_per_window": cfg.tokens_per_window, "positions": positions,
                "adaptor_input_dim": cfg.adaptor_input_dim}
    a = cfg.audio  # qwen2_audio: the processor cuts the clip at one window
    return {"seconds": min(frames, window) / MEL_FRAMES_PER_SECOND, "windows": 1, "tokens_per_window": a.out_frames,
            "positions": int(a.output_lengths(min(frames, window))), "adaptor_input_dim": 0}


def _meshes(chips: int) -> list[tuple[int, int]]:
    return [(chips // m, m) for m in range(1, chips + 1) if chips % m == 0]


def topology_plan(hf_config: dict, name: str, *, batch: int, seq_len: int,
                  dtypes=("float32", "bfloat16"), headroom: float = HEADROOM,
                  audio_seconds: float | None = None) -> dict:
    """Per-chip bytes on every (data, model) mesh of a TPU slice and, per dtype, the smallest model
    axis that fits with `headroom` to spare."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    topo = TOPOLOGIES[name]
    _, audio, text, _ = _configs(hf_config)
    span = audio_span(hf_config, audio_seconds)
    budget = int((1 - headroom) * topo["hbm"])
    rows, choice = [], {}
    for dtype in dtypes:
        nb = DTYPE_BYTES[dtype]
        for data, model in _meshes(topo["chips"]):
            ok_heads = text.heads % model == 0 and text.kv_heads % model == 0
            local = -(-batch // data)
            params = param_bytes_per_chip(hf_config, model=model, dtype_bytes=nb)
            kv = kv_cache_bytes(text, batch=local, length=seq_len, dtype_bytes=nb) // model
            act = _activations(audio, text, batch=local, seq_len=seq_len, nbytes=nb, model=model,
                               span=span)["peak"]
            total = params + kv + act
            fits = ok_heads and total <= budget
            rows.append({"dtype": dtype, "data": data, "model": model, "params": params, "kv_cache": kv,
                         "activations": act, "total": total, "fits": fits,
                         "note": "" if ok_heads else f"model axis {model} does not divide "
                                                     f"{text.heads} heads / {text.kv_heads} KV heads"})
            if fits and dtype not in choice:
                choice[dtype] = {"data": data, "model": model, "mesh": f"data={data},model={model}"}
        choice.setdefault(dtype, None)
    return {"name": name, "chips": topo["chips"], "hbm_per_chip": topo["hbm"], "headroom": headroom,
            "budget_per_chip": budget, "meshes": rows, "choice": choice}


def topology_names(topology) -> list[str]:
    """None -> []; "all" -> every known topology; a name, "v4-8,v5e-8" or a list of names."""
    if topology is None:
        return []
    names = topology.split(",") if isinstance(topology, str) else [n for t in topology for n in t.split(",")]
    names = [n.strip() for n in names if n.strip()]
    if "all" in names:
        return list(TOPOLOGIES)
    for n in names:
        if n not in TOPOLOGIES:
            raise ValueError(f"unknown topology {n!r}; known: {', '.join(TOPOLOGIES)} (or 'all')")
    return list(dict.fromkeys(names))


def plan(hf_config: dict, *, batch: int, seq_len: int, dtypes=("float32", "bfloat16"),
         topology=None, audio_seconds: float | None = None) -> dict:
    """Memory plan of one (batch, seq_len) prefill for an HF config dict (qwen2_audio, kimi_audio,
    qwen2, llama).

    Returns {"model_type", "geometry", "params" (count per part and total), "param_bytes",
    "kv_cache", "activations", "total" (bytes per dtype on one device), "topologies" (per-chip
    bytes of every mesh and the mesh picked, for each topology asked: a name, several, or "all"),
    "topology" (the first of them), "audio" (audio_span: windows and decoder positions of
    `audio_seconds` of audio per row, None: 30 s; absent for text-only models), "assumptions"}.
    seq_len counts every decoder position (text plus audio tokens: audio["positions"] of them)."""
    for d in dtypes:
        if d not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {d!r}; known: {', '.join(DTYPE_BYTES)}")
    mt, audio, text, _ = _configs(hf_config)
    span = audio_span(hf_config, audio_seconds)
    counts = param_counts(hf_config)
    geometry = {"text": {"vocab": text.vocab_size, "hidden": text.hidden, "layers": text.layers,
                         "heads": text.heads, "kv_heads": text.kv_heads, "head_dim": text.head_dim,
                         "intermediate": text.intermediate, "tied_embeddings": text.tie_embeddings}}
    if audio is not None:
        geometry["audio"] = {"mel": audio.num_mel_bins, "d_model": audio.d_model, "layers": audio.layers,
                             "heads": audio.heads, "ffn": audio.ffn_dim,
                             "max_source_positions": audio.max_source_positions,
                             "audio_tokens_per_clip": span["tokens_per_window"]}
    if mt == "kimi_audio":
        k = _model_config(hf_config)
        geometry["mimo"] = {"layers": k.mimo_layers, "from_layer": k.mimo_from_layer,
                            "adaptor_input_dim": k.adaptor_input_dim}
    out = {"model_type": mt, "geometry": geometry, "batch": batch, "seq_len": seq_len, "dtypes": list(dtypes),
           "params": counts, "param_bytes": {}, "kv_cache": {"per_token_bytes": {}, "bytes": {}},
           "activations": {}, "total": {}, "assumptions": ASSUMPTIONS + FAMILY_ASSUMPTIONS.get(mt, [])}
    if span is not None:
        out["audio"] = span
    for d in dtypes:
        nb = DTYPE_BYTES[d]
        out["param_bytes"][d] = counts["total"] * nb
        out["kv_cache"]["per_token_bytes"][d] = kv_cache_bytes(text, batch=1, length=1, dtype_bytes=nb)
        out["kv_cache"]["bytes"][d] = kv_cache_bytes(text, batch=batch, length=seq_len, dtype_bytes=nb)
        out["activations"][d] = _activations(audio, text, batch=batch, seq_len=seq_len, nbytes=nb, span=span)
        out["total"][d] = out["param_bytes"][d] + out["kv_cache"]["bytes"][d] + out["activations"][d]["peak"]
    names = topology_names(topology)
    if names:
        out["topologies"] = [topology_plan(hf_config, n, batch=batch, seq_len=seq_len, dtypes=dtypes,
                                           audio_seconds=audio_seconds) for n in names]
        out["topology"] = out["topologies"][0]
    return out


# ----------------------------------------------------------------------------------------------
# Text


def _gib(n: int) -> str:
    return f"{n / GiB:8.2f} GiB"


def format_plan(result: dict, *, assumptions: bool = True) -> str:
    g = result["geometry"]
    t = g["text"]
    dts = result["dtypes"]
    lines = [f"model_type {result['model_type']}: text vocab {t['vocab']}, hidden {t['hidden']}, "
             f"{t['layers']} layers, {t['heads']} heads / {t['kv_heads']} KV heads x {t['head_dim']}, "
             f"ffn {t['intermediate']}, {'tied' if t['tied_embeddings'] else 'untied'} head"]
    if "audio" in g:
        a = g["audio"]
        lines.append(f"  audio: {a['mel']} mel, d {a['d_model']}, {a['layers']} layers, {a['heads']} heads, "
                     f"ffn {a['ffn']}, {a['audio_tokens_per_clip']} tokens per 30 s window")
    if "mimo" in g:
        m = g["mimo"]
        lines.append(f"  MIMO (audio output): {m['layers']} layers from layer {m['from_layer']}, loaded, "
                     f"off the text path (no KV cache); adaptor input {m['adaptor_input_dim']}")
    lines += ["", f"{'part':<16}{'parameters':>16}" + "".join(f"{d:>16}" for d in dts)]
    for part, n in result["params"].items():
        if n or part == "total":
            lines.append(f"{part:<16}{n:>16,}" + "".join(f"{_gib(n * DTYPE_BYTES[d]):>16}" for d in dts))
    lines += [""]
    if "audio" in result:
        au = result["audio"]
        lines.append(f"audio {au['seconds']:g} s per row: {au['windows']} encoder window(s), {au['positions']} "
                     f"decoder positions (part of the length)"
                     + (f"; length {result['seq_len']} is shorter" if result["seq_len"] < au["positions"] else ""))
    lines += [f"batch {result['batch']} x length {result['seq_len']} (prefill, one device)",
              f"{'':<28}" + "".join(f"{d:>16}" for d in dts)]
    kv = result["kv_cache"]
    acts = result["activations"]
    table = [
        ("parameters", [result["param_bytes"][d] for d in dts]),
        ("KV cache", [kv["bytes"][d] for d in dts]),
        ("activations (peak, est.)", [acts[d]["peak"] for d in dts]),
        ("total", [result["total"][d] for d in dts]),
    ]
    for name, vals in table:
        lines.append(f"{name:<28}" + "".join(f"{_gib(v):>16}" for v in vals))
    lines.append(f"{'KV cache per token':<28}" + "".join(f"{kv['per_token_bytes'][d] / 1024:>12.1f} KiB"
                                                        for d in dts))
    for topo in result.get("topologies", []):
        lines += ["", f"TPU {topo['name']}: {topo['chips']} chips x {topo['hbm_per_chip'] / GiB:.0f} GiB, "
                      f"budget {topo['budget_per_chip'] / GiB:.1f} GiB per chip ({topo['headroom']:.0%} headroom)",
                  f"{'dtype':<10}{'mesh (data, model)':>20}{'params':>14}{'KV cache':>14}{'activations':>14}"
                  f"{'per chip':>14}  fits"]
        for r in topo["meshes"]:
            lines.append(f"{r['dtype']:<10}{str((r['data'], r['model'])):>20}{_gib(r['params']):>14}"
                         f"{_gib(r['kv_cache']):>14}{_gib(r['activations']):>14}{_gib(r['total']):>14}  "
                         f"{'yes' if r['fits'] else 'no'}{'  (' + r['note'] + ')' if r['note'] else ''}")
        for d, c in topo["choice"].items():
            pick = f"mesh (data {c['data']}, model {c['model']}): --mesh {c['mesh']}" if c else "nothing fits"
            lines.append(f"choice for {d} on {topo['name']}: {pick}")
    if assumptions:
        lines += ["", "assumptions:"] + [f"  - {a}" for a in result["assumptions"]]
    return "\n".join(lines)


def load_hf_config(spec: str) -> dict:
    """'qwen2-audio-7b', 'qwen2-audio-tiny', 'kimi-audio-7b', 'whisper-large-v3' (`plan --aot` only), a
    config.json path, or a checkpoint folder holding config.json. A Kimi-Audio config.json gets its Whisper config embedded as
    "whisper_config" from the `whisper-large-v3/config.json` beside it (a release or a converted
    checkpoint), or, with none there, Whisper-large-v3's (the release's encoder)."""
    key = spec.lower().replace("_", "-")
    if key == "qwen2-audio-7b":
        return copy.deepcopy(QWEN2_AUDIO_7B_CONFIG)
    if key == "qwen2-audio-tiny":
        return tiny_config()
    if key in ("kimi-audio-7b", "kimi-audio-7b-instruct"):
        return copy.deepcopy(KIMI_AUDIO_7B_CONFIG)
    if key == "whisper-large-v3":
        return copy.deepcopy(WHISPER_LARGE_V3_CONFIG)
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no config.json at {p} (give a config.json, a checkpoint folder, 'qwen2-audio-7b', "
                                f"'qwen2-audio-tiny' or 'kimi-audio-7b')")
    cfg = json.loads(p.read_text())
    if _family(cfg) == "kimi_audio" and "whisper_config" not in cfg:
        from affjax.models.kimi_audio.params import WHISPER_DIR

        w = p.parent / WHISPER_DIR / "config.json"
        cfg["whisper_config"] = json.loads(w.read_text()) if w.is_file() else copy.deepcopy(WHISPER_LARGE_V3_CONFIG)
    return cfg


def main_plan(args) -> int:
    """`affjax plan`: the full plan for the first (batch, length), then a grid of totals."""
    try:
        cfg = load_hf_config(args.ckpt_config)
        batches, lengths = list(args.batch) or [1], list(args.length) or [1024]
        secs = getattr(args, "audio_seconds", None)
        first = plan(cfg, batch=batches[0], seq_len=lengths[0], topology=args.topology, audio_seconds=secs)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(format_plan(first, assumptions=False))
    dts = first["dtypes"]
    topos = [t["name"] for t in first.get("topologies", [])]
    short = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
    print("\n" + f"{'batch':>6}{'length':>8}" + "".join(f"{'KV ' + d:>18}{'total ' + d:>18}" for d in dts)
          + "".join(f"{'model ' + t + ' ' + short.get(d, d):>20}" for t in topos for d in dts))
    for b in batches:
        for n in lengths:
            r = plan(cfg, batch=b, seq_len=n, topology=topos or None, audio_seconds=secs)
            row = f"{b:>6}{n:>8}" + "".join(f"{_gib(r['kv_cache']['bytes'][d]):>18}{_gib(r['total'][d]):>18}"
                                            for d in dts)
            row += "".join(f"{(str(c['model']) if (c := t['choice'][d]) else 'none'):>20}"
                           for t in r.get("topologies", []) for d in dts)
            print(row)
    print("\nassumptions:\n" + "\n".join(f"  - {a}" for a in first["assumptions"]))
    return 0
