"""Kimi-Audio against the official code itself (a one-off check, not part of the suite):

    python -m affjax.bench.kimi_official --official DIR [--glm4 DIR] [--kimia-infer DIR] [--pythonpath DIR]
    python -m affjax.bench.kimi_official --official DIR --pythonpath DIR --time [--rounds N] [--out JSON]

`--official DIR` holds Kimi-Audio's modeling file (`modeling_moonshot_kimia.py`, the Hugging Face
remote code, or `modeling_kimia.py`, its copy in the official repository's finetune_codes/; not
the Ascend port, which needs torch_npu) with
`configuration_moonshot_kimia.py`; `--glm4 DIR` is a GLM-4-Voice checkout (its
`speech_tokenizer/modeling_whisper.py`, `configuration_whisper.py`); `--kimia-infer DIR` is a
MoonshotAI/Kimi-Audio checkout (or its `kimia_infer/models/tokenizer/whisper_Lv3/` folder: the
log-mel code with the release's `mel_filters.npz`). Nothing of them is copied here: they are
imported from DIR at run time, in a child process, because they were written for transformers
4.x and do not import under transformers 5; `--pythonpath` puts such a transformers first on the
child's path, e.g.

    pip install --target TF451 --no-deps transformers==4.51.3 tokenizers==0.21.1 huggingface_hub==0.30.2

(the Kimi file needs >= 4.45: before, transformers' apply_rotary_pos_emb indexes cos / sin by
position ids a second time, after the Kimi file did).

What runs:
- Kimi-Audio: a tiny random model in the release's layout (the release's vocabulary, q/k/v
  biases, a MIMO branch) is built by the official `MoonshotKimiaForCausalLM` (random weights, O(1)
  activations) and loaded into affjax through the converter's key table. Three items (instruction,
  then clips of 2 s, 12 s and 45 s worth of speech codes, 12.5 Hz) as the prompt manager lays them
  out (affjax.models.kimi_audio.inputs.prompt_streams); the continuous features are random (the
  Whisper encoder is not in the modeling file: the official model takes them as input). The
  official forward runs each item alone (its embedding code takes one item per call), affjax the
  three as one right-padded batch. Compared: the fused input embeddings (the official hidden
  state before layer 0), text logits (lm_head) and audio logits (MIMO branch, mimo_output) at
  every 17th position and the last.
- GLM-4-Voice (--glm4): a tiny random WhisperVQEncoder (the tests' sizes: causal convolutions,
  block-causal attention, pooling after layer 1 of 2, 256 codes; its codebook drawn from its own
  states so that codes spread) built by the official class; codes of the same three clips, each
  clip as Kimi-Audio's Glm4Tokenizer tokenizes it (utils.extract_speech_token's steps for one
  clip, on the CPU: that function itself moves tensors to CUDA), against
  affjax.models.kimi_audio.speech_tokenizer.tokenize loading the official model's saved weights.
- Log-mel features (--kimia-infer): kimia_infer's `log_mel_spectrogram(pad_or_trim(window))` of
  each 30 s window of the same clips against affjax.models.kimi_audio.inputs.window_features
  (transformers' WhisperFeatureExtractor, 128 bins: its Slaney filter bank instead of the
  release's mel_filters.npz).

--time (instead of the check): the prefill of the official model against affjax's on the same
weights and input, CPU, float32, at the widths of `affjax bench --model kimi-audio`
(affjax.bench.kimi.BENCH_CONFIG: text d512 x 8, adaptor 1536 -> 512, the release's vocabulary, no
MIMO layers), batch 1 (the official embedding code takes one item per call), that bench's input (one
30 s window: 375 speech codes, 40 text tokens, the control tokens). The LLM side only: the official
model takes the adaptor's input (4 stacked Whisper frames per code) and so does affjax's side here,
the same random features; no Whisper encoder on either side. Timed: affjax's engine (fused
embeddings, then Engine.prefill_rest: decoder layers building the KV cache, last position's
logits); the official model doing the same work (`model.model(...)`, its KV cache returned, then
`lm_head` on the last position); and, reported apart, the official `forward` as its generation loop
calls it first (kimia.py: both heads over every position). Each round times the three back to back
(the child waits while the parent runs); ratios are medians of the per-round ratios. PyTorch runs
--threads threads (default 1); XLA its own CPU client as `affjax bench` does. The flash_attn stub
(below) runs torch's fused scaled_dot_product_attention here, not its explicit softmax.

Shims (the official files are not edited; the child says which ran): `flash_attn` is a stub
module, because the official Kimi attention has no other path: its `flash_attn_func` is exact
softmax attention (causal, grouped-query) computed in float32 or wider and returned in the
input dtype; `is_flash_attn_2_available` reads true while the modeling file is imported;
`torch.cuda.current_device()` answers "cpu" (the embedding code moves tensors to it).
Fed float32, the official attention casts q, k, v to float16 before flash attention (and the
output back): the float32 row measures that too; the float64 row runs the same official model
in float64 (no such cast; its RMSNorm still computes in float32).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

import numpy as np

SECONDS = (2.0, 12.0, 45.0)
PROMPT_TOKENS = (300, 100, 180)
EVERY = 17  # compared positions: every 17th and the last
SEED = 0
TIME_AUDIO_SECONDS, TIME_TEXT_TOKENS = 30.0, 40  # --time: the input of `affjax bench --model kimi-audio`

# a tiny config.json with the release's fields (MoonshotKimiaForCausalLM); the vocabulary is the
# release's, so that the control ids and speech codes (152064 + code) index it
KIMI_CONFIG = {
    "architectures": ["MoonshotKimiaForCausalLM"], "model_type": "kimi_audio",
    "vocab_size": 168448, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 3,
    "num_attention_heads": 4, "num_key_value_heads": 2, "hidden_act": "silu", "rms_norm_eps": 1e-6,
    "rope_theta": 1e6, "rope_scaling": None, "max_position_embeddings": 8192, "initializer_range": 0.02,
    "tie_word_embeddings": False, "use_cache": True, "bos_token_id": 151643, "eos_token_id": 151644,
    "pad_token_id": 152063, "kimia_mimo_layers": 1, "kimia_mimo_audiodelaytokens": 6,
    "kimia_mimo_transformer_from_layer_index": 1, "kimia_audio_output_vocab": 16896,
    "kimia_text_output_vocab": 152064, "num_audio_special_tokens": 512, "num_base_tokens": 151643,
    "kimia_token_offset": 152064, "use_whisper_feature": True, "kimia_adaptor_input_dim": 256,
    "kimia_media_begin": 151661, "kimia_media_end": 151663,
}
# the Whisper folder's config (affjax's model has the audio tower; these features bypass it)
WHISPER_CONFIG = {"model_type": "whisper", "num_mel_bins": 128, "d_model": 64, "encoder_layers": 1,
                  "encoder_attention_heads": 4, "encoder_ffn_dim": 128, "max_source_positions": 1500}
# GLM-4-Voice's tokenizer config at the tests' sizes (tests/glm4_speech_reference.tiny_config)
GLM4_CONFIG = {
    "activation_function": "gelu", "d_model": 64, "encoder_attention_heads": 4, "encoder_ffn_dim": 128,
    "encoder_layers": 4, "decoder_layers": 2, "decoder_attention_heads": 4, "decoder_ffn_dim": 128,
    "num_mel_bins": 128, "max_source_positions": 1500, "encoder_causal_attention": False,
    "encoder_causal_convolution": True, "pooling_kernel_size": 4, "pooling_position": 1, "pooling_type": "avg",
    "quantize_causal_block_size": 40, "quantize_causal_encoder": False, "quantize_encoder_only": True,
    "quantize_position": 2, "quantize_vocab_size": 256, "quantize_ema_decay": 0.99, "scale_embedding": False,
    "dropout": 0.0, "attention_dropout": 0.0, "activation_dropout": 0.0,
}


# ----------------------------------------------------------------------------------------------
# the official side (child process)


def _import_from(folder: Path, package: str, module: str):
    """`module` of `folder` as a submodule of a synthetic package, so its relative imports resolve."""
    if package not in sys.modules:
        pkg = types.ModuleType(package)
        pkg.__path__ = [str(folder)]
        sys.modules[package] = pkg
    return importlib.import_module(f"{package}.{module}")


def _flash_attn_stub(shims: list[str], fused: bool = False) -> None:
    """`fused` (--time): torch's scaled_dot_product_attention where it gives the same result (its
    fused CPU kernel, faster than the explicit softmax below), as flash attention is fused."""
    import torch

    def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, **_):
        """q ['B S H d'], k/v ['B S Hkv d'] -> ['B S H d'] in q's dtype."""
        dtype = q.dtype
        wide = torch.promote_types(dtype, torch.float32)
        q, k, v = (t.to(wide).transpose(1, 2) for t in (q, k, v))
        if fused and q.shape[2] == k.shape[2]:  # SDPA's causal mask is top-left: equal lengths only
            out = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=softmax_scale,
                                                                   enable_gqa=True)
            return out.transpose(1, 2).to(dtype)
        rep = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
        s = (q @ k.transpose(-1, -2)) * (softmax_scale or q.shape[-1] ** -0.5)
        if causal:  # aligned bottom-right, as flash_attn >= 2.1
            keep = torch.ones(s.shape[-2:], dtype=torch.bool).tril(s.shape[-1] - s.shape[-2])
            s = s.masked_fill(~keep, float("-inf"))
        return (s.softmax(-1) @ v).transpose(1, 2).to(dtype)

    def unused(*args, **kwargs):
        raise RuntimeError("flash_attn stub: only flash_attn_func (no padding mask) is provided")

    fa = types.ModuleType("flash_attn")
    fa.flash_attn_func = flash_attn_func
    fa.flash_attn_varlen_func = fa.flash_attn_qkvpacked_func = fa.flash_attn_varlen_qkvpacked_func = unused
    bp = types.ModuleType("flash_attn.bert_padding")
    bp.index_first_axis = bp.pad_input = bp.unpad_input = unused
    fa.bert_padding = bp
    sys.modules.update({"flash_attn": fa, "flash_attn.bert_padding": bp})
    shims.append("flash_attn: stub module, flash_attn_func = exact causal GQA softmax attention (float32 or wider)"
                 + (", torch's scaled_dot_product_attention" if fused else ""))


def _randomize(model, seed: int) -> None:
    """O(1) activations (as tests/kimi_reference.py): weights ~ N(0, 1/fan_in), biases ~ N(0, 0.02^2),
    RMSNorm weights 1 + N(0, 0.1^2), embeddings ~ N(0, 0.5^2)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.1 * noise)
            elif name.endswith("bias"):
                p.copy_(0.02 * noise)
            elif "embed" in name:
                p.copy_(0.5 * noise)
            else:
                p.copy_(noise * p.shape[1] ** -0.5)


def _import_official(official: Path, shims: list[str], fused: bool = False):
    """The official (configuration, modeling) modules of folder `official`, with the shims."""
    import transformers.utils

    name = next((n for n in ("modeling_moonshot_kimia", "modeling_kimia") if (official / f"{n}.py").is_file()), None)
    if name is None or not (official / "configuration_moonshot_kimia.py").is_file():
        raise SystemExit(f"{official}: needs modeling_moonshot_kimia.py (or modeling_kimia.py) and "
                         "configuration_moonshot_kimia.py")
    # transformers' own modules first, so that they see flash attention as unavailable (it is)
    importlib.import_module("transformers.models.qwen2.modeling_qwen2")
    _flash_attn_stub(shims, fused)
    available = transformers.utils.is_flash_attn_2_available
    transformers.utils.is_flash_attn_2_available = lambda: True
    try:
        config_mod = _import_from(official, "_kimi_official", "configuration_moonshot_kimia")
        modeling = _import_from(official, "_kimi_official", name)
    finally:  # the module keeps its references; nothing else may see flash attention
        transformers.utils.is_flash_attn_2_available = available
        for m in ("flash_attn", "flash_attn.bert_padding"):
            sys.modules.pop(m, None)
    shims.append("transformers.utils.is_flash_attn_2_available: true while the modeling file is imported")
    shims.append(f"imported {official / name}.py")
    return config_mod, modeling


def _official_model(official: Path, work: Path, shims: list[str], fused: bool = False):
    """The official MoonshotKimiaForCausalLM of work/config.json (float32, random O(1) weights),
    its weights saved to work/kimi.safetensors for affjax."""
    import torch
    from safetensors.torch import save_file

    config_mod, modeling = _import_official(official, shims, fused)
    c = json.loads((work / "config.json").read_text())
    drop = ("architectures", "model_type", "whisper_config")
    config = config_mod.KimiAudioConfig(**{k: v for k, v in c.items() if k not in drop})
    torch.manual_seed(SEED)
    model = modeling.MoonshotKimiaForCausalLM(config).float().eval()
    _randomize(model, SEED)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "kimi.safetensors"))
    return model


def _child_kimi(official: Path, work: Path, shims: list[str]) -> None:
    import torch

    model = _official_model(official, work, shims)

    inp = np.load(work / "kimi_inputs.npz")
    out = {}
    for dtype in (torch.float32, torch.float64):
        model.to(dtype)
        tag = str(dtype).removeprefix("torch.")
        for i in range(len(SECONDS)):
            n = int(inp[f"n{i}"])
            ids = lambda key: torch.from_numpy(inp[key][i, :n].astype(np.int64))[None]  # noqa: E731
            cont = torch.from_numpy(inp["continuous"][i, :n])[None]
            feats = torch.from_numpy(inp[f"feats{i}"]).to(dtype)[None]
            with torch.no_grad():
                res = model(input_ids=ids("audio"), text_input_ids=ids("text"), whisper_input_feature=[feats],
                            is_continuous_mask=cont, position_ids=torch.arange(n)[None], output_hidden_states=True,
                            return_dict=True)
            sel = torch.from_numpy(inp[f"sel{i}"])
            # (mimo_output(MIMO branch), lm_head(h)) in both official files, as kimia.py unpacks them:
            # audio_logits, text_logits = ... (the finetune copy names them the other way round)
            out[f"{tag}_audio{i}"] = res.logits[0][0, sel].double().numpy()
            out[f"{tag}_text{i}"] = res.logits[1][0, sel].double().numpy()
            out[f"{tag}_embeds{i}"] = res.hidden_states[0][0].double().numpy()
    np.savez(work / "kimi_official.npz", **out)


def _child_glm4(glm4: Path, work: Path, shims: list[str]) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import WhisperFeatureExtractor

    folder = glm4 / "speech_tokenizer" if (glm4 / "speech_tokenizer").is_dir() else glm4
    config_mod = _import_from(folder, "_glm4_official", "configuration_whisper")
    modeling = _import_from(folder, "_glm4_official", "modeling_whisper")
    shims.append(f"imported {folder / 'modeling_whisper.py'}")
    config = config_mod.WhisperVQConfig(**GLM4_CONFIG)
    config._attn_implementation = "eager"
    torch.manual_seed(SEED)
    model = modeling.WhisperVQEncoder(config).eval()
    fe = WhisperFeatureExtractor(feature_size=128, sampling_rate=16000, hop_length=160, chunk_length=30, n_fft=400)
    per = model.conv1.stride[0] * model.conv2.stride[0] * config.pooling_kernel_size

    states = []  # the pre-quantizer states: the output of the last layer
    model.layers[-1].register_forward_hook(lambda m, a, o: states.append(o[0]))

    def run(pieces):
        """extract_speech_token's steps for the 30 s pieces of one clip, on the CPU."""
        f = fe(pieces, sampling_rate=16000, return_attention_mask=True, return_tensors="pt", padding="longest",
               pad_to_multiple_of=per * fe.hop_length)
        with torch.no_grad():
            out = model(**f)
        mask = f.attention_mask[:, ::model.conv1.stride[0] * model.conv2.stride[0]][:, ::config.pooling_kernel_size]
        return out.quantized_token_ids, mask.bool(), states.pop()

    g = torch.Generator().manual_seed(SEED)
    with torch.no_grad():  # LayerNorms off their (1, 0) init; a codebook from the model's own states
        for name, p in model.named_parameters():
            if "layer_norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.1 * torch.randn(p.shape, generator=g))
        model.embed_positions.weight.mul_(0.5)
        inp = np.load(work / "glm4_inputs.npz")
        _, mask, h = run([inp["calibration"]])
        h = h[mask]
        pick = torch.randint(0, len(h), (config.quantize_vocab_size,), generator=g)
        model.codebook.weight.copy_(h[pick] + 0.3 * h.std() * torch.randn(h[pick].shape, generator=g))
        model.ema_weight.copy_(model.codebook.weight)
    (work / "glm4").mkdir()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(work / "glm4" / "model.safetensors"))
    config.save_pretrained(str(work / "glm4"))
    fe.save_pretrained(str(work / "glm4"))

    out = {}
    for i in range(len(SECONDS)):
        wave = inp[f"wave{i}"]
        codes, mask, h = run([wave[s:s + 480000] for s in range(0, len(wave), 480000)])
        _, _, dist = modeling.vector_quantize(h, model.codebook.weight)
        dist = dist.reshape(*h.shape[:2], -1)
        top2 = torch.topk(dist, 2, dim=-1, largest=False).values
        out[f"codes{i}"] = codes[mask].numpy()
        out[f"gap{i}"] = (top2[..., 1] - top2[..., 0])[mask].numpy()
    np.savez(work / "glm4_official.npz", **out)


def _child_mel(root: Path, work: Path, shims: list[str]) -> None:
    folder = root / "kimia_infer" / "models" / "tokenizer" / "whisper_Lv3"
    folder = folder if folder.is_dir() else root
    _flash_attn_stub([])  # its modeling_whisper imports flash_attn; the log-mel code never calls it
    try:
        whisper = _import_from(folder, "_kimia_whisper", "whisper")
    finally:
        for m in ("flash_attn", "flash_attn.bert_padding"):
            sys.modules.pop(m, None)
    shims.append(f"imported {folder / 'whisper.py'} (flash_attn stub while importing)")
    inp = np.load(work / "glm4_inputs.npz")
    out = {}
    for i in range(len(SECONDS)):
        wave = inp[f"wave{i}"]
        for j, s in enumerate(range(0, len(wave), 480000)):  # tokenize_waveform's 30 s windows
            out[f"mel{i}_{j}"] = whisper.log_mel_spectrogram(whisper.pad_or_trim(wave[s:s + 480000])).numpy()
    np.savez(work / "mel_official.npz", **out)


def _timed(fn) -> tuple[float, float]:
    """(wall, CPU) seconds of fn(): the CPU time of all the process's threads shows how many cores
    a side kept busy."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def _child_time(official: Path, work: Path, shims: list[str], threads: int) -> None:
    """The official side of --time: after a warm-up, one timed round per line "round" read from
    stdin, answered by a line "@times {...}" on stdout. The parent times affjax between rounds, so
    the two processes never run at once."""
    import torch

    torch.set_num_threads(threads)
    model = _official_model(official, work, shims, fused=True)
    inp = np.load(work / "time_inputs.npz")
    t = lambda key: torch.from_numpy(inp[key])[None]  # noqa: E731  (batch 1: one item per call)
    kw = dict(input_ids=t("audio").long(), text_input_ids=t("text").long(), whisper_input_feature=[t("feats")],
              is_continuous_mask=t("continuous"), position_ids=torch.arange(inp["audio"].shape[0])[None])

    @torch.inference_mode()
    def prefill():
        # affjax's prefill's work: the official model (fused embeddings, decoder layers returning
        # their KV cache, final norm), then lm_head on the last position
        out = model.model(**kw, use_cache=True, return_dict=True)
        return model.lm_head(out.last_hidden_state[0][:, -1])

    @torch.inference_mode()
    def forward():
        # the official generation loop's first call (kimia.py): both heads at every position
        return model(**kw, return_dict=False)

    calls = {"prefill": prefill, "forward": forward}
    first = {name: _timed(f)[0] for name, f in calls.items()}
    np.save(work / "official_logits.npy", prefill().numpy())
    (work / "shims.json").write_text(json.dumps(shims))
    print("@ready " + json.dumps(first), flush=True)
    for line in sys.stdin:
        if line.strip() != "round":
            break
        times = {}
        for name, f in calls.items():
            times[f"official_{name}_s"], times[f"official_{name}_cpu_s"] = _timed(f)
        print("@times " + json.dumps(times), flush=True)


def child(args) -> None:
    import torch
    import transformers

    shims = [f"transformers {transformers.__version__}, torch {torch.__version__}"]
    if int(transformers.__version__.split(".")[0]) >= 5:
        raise SystemExit(f"the official files need transformers 4.45 .. 4.x (this is {transformers.__version__}): "
                         "pass --pythonpath DIR with one installed there (see the module's docstring)")
    torch.cuda.current_device = lambda: "cpu"
    shims.append('torch.cuda.current_device() -> "cpu"')
    work = Path(args.child)
    if args.time:
        _child_time(Path(args.official), work, shims, args.threads)
        return
    _child_kimi(Path(args.official), work, shims)
    if args.glm4:
        _child_glm4(Path(args.glm4), work, shims)
    if args.kimia_infer:
        _child_mel(Path(args.kimia_infer), work, shims)
    (work / "shims.json").write_text(json.dumps(shims))


# ----------------------------------------------------------------------------------------------
# affjax's side


def kimi_inputs(rng) -> dict:
    """Three items, right-padded: the two streams, the speech-code positions, random features."""
    from affjax.models.kimi_audio.inputs import code_count, prompt_streams

    items = []
    for secs, words in zip(SECONDS, PROMPT_TOKENS):
        n_codes = code_count(np.zeros(int(secs * 16000), np.float32))
        parts = [("text", rng.integers(0, 151643, words)), ("audio", rng.integers(0, 16384, n_codes))]
        audio, text, cont = prompt_streams(parts, token_offset=KIMI_CONFIG["kimia_token_offset"])
        feats = rng.standard_normal((n_codes, KIMI_CONFIG["kimia_adaptor_input_dim"])).astype(np.float32)
        items.append((audio, text, cont, feats))
    T = max(len(a) for a, *_ in items)
    out = {"audio": np.full((len(items), T), 151666, np.int32), "text": np.full((len(items), T), 151666, np.int32),
           "continuous": np.zeros((len(items), T), bool)}
    for i, (audio, text, cont, feats) in enumerate(items):
        n = len(audio)
        out["audio"][i, :n], out["text"][i, :n], out["continuous"][i, :n] = audio, text, cont
        out[f"n{i}"], out[f"feats{i}"] = n, feats
        out[f"sel{i}"] = np.unique(np.r_[np.arange(0, n, EVERY), n - 1])
    return out


def _load_ours(work: Path, config: dict):
    """affjax's KimiAudio of `config` (a config.json with its whisper_config) holding the official
    model's weights (work/kimi.safetensors) and a random audio tower."""
    import torch
    from flax import nnx
    from safetensors.numpy import load_file
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder

    from affjax.models.kimi_audio import params as kimi_params
    from affjax.models.kimi_audio.modeling import KimiAudio, KimiAudioConfig
    from affjax.models.layers import abstract_module
    from affjax.models.weights import KeyTable, iter_state_dict, load_streaming

    cfg = KimiAudioConfig.from_hf(config)
    torch.manual_seed(SEED)  # the audio tower is required by the key table, unused here
    whisper = WhisperEncoder(WhisperConfig(**config["whisper_config"])).state_dict()
    sd = {f"{kimi_params.WHISPER_DIR}/model.encoder.{k}": v for k, v in whisper.items()}
    sd.update(load_file(str(work / "kimi.safetensors")))
    abstract = abstract_module(lambda rngs: KimiAudio(cfg, rngs=rngs))
    state = load_streaming(abstract, KeyTable(kimi_params.KEYS, kimi_params.KEY_ALIASES), iter_state_dict(sd),
                           ignore=kimi_params.skipped)
    return nnx.merge(nnx.split(abstract)[0], state)


def ours_kimi(work: Path, inp: dict) -> dict:
    import jax.numpy as jnp
    from flax import nnx

    model = _load_ours(work, {**KIMI_CONFIG, "whisper_config": WHISPER_CONFIG})

    # the features as a batch of "windows", one per item, and each code position's index into them
    B, T = inp["audio"].shape
    F = max(len(inp[f"feats{i}"]) for i in range(B))
    feats = np.zeros((B, F, KIMI_CONFIG["kimia_adaptor_input_dim"]), np.float32)
    index = np.zeros((B, T), np.int32)
    valid = np.zeros((B, T), bool)
    for i in range(B):
        f = inp[f"feats{i}"]
        feats[i, :len(f)] = f
        index[i, np.flatnonzero(inp["continuous"][i])] = i * F + np.arange(len(f))
        valid[i, :inp[f"n{i}"]] = True

    @nnx.jit
    def forward(m, audio, text, feats, index, continuous, valid):
        x = m.embed_inputs(audio, text, m.vq_adaptor(feats), index, continuous)  # what encode_audio gives
        h, branch = m.decode(x, valid, with_audio=True)
        return x, h, branch

    x, h, branch = forward(model, *(jnp.asarray(a) for a in (inp["audio"], inp["text"], feats, index,
                                                              inp["continuous"], valid)))
    out = {}
    for i in range(B):
        sel = inp[f"sel{i}"]
        out[f"embeds{i}"] = np.asarray(x[i, :inp[f"n{i}"]])
        out[f"text{i}"] = np.asarray(model.text_logits(h[i, sel]))
        out[f"audio{i}"] = np.asarray(model.audio_logits(branch[i, sel]))
    return out


def ours_glm4(work: Path, waves: list[np.ndarray]) -> list[np.ndarray]:
    from transformers import WhisperFeatureExtractor

    from affjax.models.kimi_audio.speech_tokenizer import load_hf_folder, tokenize

    model, _ = load_hf_folder(work / "glm4")
    return tokenize(model, WhisperFeatureExtractor.from_pretrained(str(work / "glm4")), waves)


# ----------------------------------------------------------------------------------------------
# --time: prefill against the official model, side by side


def time_inputs(cfg, seed: int = SEED):
    """One item as `affjax bench --model kimi-audio` builds it (one 30 s window: 375 speech codes,
    40 text tokens, the prompt's control tokens), random 12.5 Hz features for the window (the
    adaptor's input: what the official model takes) and the official side's arrays of the item."""
    from affjax.bench import kimi

    batch = kimi.inputs(cfg, 1, TIME_AUDIO_SECONDS, TIME_TEXT_TOKENS, seed=seed)
    rng = np.random.default_rng(seed + 1)
    feats = rng.standard_normal((len(batch.feature_lengths), cfg.tokens_per_window, cfg.adaptor_input_dim))
    feats = feats.astype(np.float32)
    cont = batch.span[0] > 0
    official = {"audio": batch.ids[0, :, 0], "text": batch.ids[0, :, 1], "continuous": cont,
                "feats": feats.reshape(-1, feats.shape[-1])[batch.audio_index[0, cont]]}  # in code order
    return batch, feats, official


def _embed_features(model, ids, valid, span, audio_index, feats):
    """The engine's embed_seq with the adaptor's input given (no Whisper encoder, as the official
    model's input)."""
    from affjax.runtime.engine import start_seq

    x = model.embed_inputs(ids[..., 0], ids[..., 1], model.vq_adaptor(feats), audio_index, span > 0)
    return start_seq(x, valid, span)


def _read_marker(proc, marker: str) -> dict:
    """The JSON after `marker` on the child's next such line; other lines go to stderr."""
    for line in proc.stdout:
        if line.startswith(marker):
            return json.loads(line[len(marker):])
        sys.stderr.write(line)
    raise SystemExit(f"error: the official side ended (exit status {proc.wait()}) before {marker.strip()!r}")


def time_prefill(args) -> dict:
    import jax
    import jax.numpy as jnp
    import torch

    from affjax.bench.kimi import BENCH_CONFIG
    from affjax.models.kimi_audio.modeling import KimiAudioConfig
    from affjax.runtime.engine import Engine

    cfg = KimiAudioConfig.from_hf(BENCH_CONFIG)
    batch, feats, official = time_inputs(cfg)
    with tempfile.TemporaryDirectory(prefix="kimi_official_time_") as tmp:
        work = Path(tmp)
        (work / "config.json").write_text(json.dumps(BENCH_CONFIG))
        np.savez(work / "time_inputs.npz", **official)
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        if args.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.pythonpath, env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "affjax.bench.kimi_official", "--official", args.official, "--child", tmp,
               "--time", "--threads", str(args.threads)]
        with subprocess.Popen(cmd, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True) as proc:
            official_first = _read_marker(proc, "@ready ")
            shims = json.loads((work / "shims.json").read_text())
            engine = Engine(_load_ours(work, BENCH_CONFIG))
            embed = engine.jitted("embed_features", _embed_features)
            arrays = tuple(jnp.asarray(a) for a in (batch.ids, batch.valid, batch.span, batch.audio_index, feats))

            def ours():
                out = engine.prefill_rest(embed(engine.state, *arrays), batch.n_prompt, [], extra=0)
                jax.block_until_ready((out.logits, out.caches))
                return out.logits

            first = _timed(ours)[0]  # compilation included
            # both sides on the same weights and inputs: the last position's text logits
            theirs = np.load(work / "official_logits.npy")
            diff = float(np.abs(np.asarray(ours()) - theirs).max())
            rounds = []
            load = [os.getloadavg()]
            # round-robin, as affjax.bench.prefill: a slow spell of this shared machine hits both sides
            for _ in range(args.rounds):
                wall, cpu = _timed(ours)
                proc.stdin.write("round\n")
                proc.stdin.flush()
                rounds.append({"affjax_s": wall, "affjax_cpu_s": cpu, **_read_marker(proc, "@times ")})
            load.append(os.getloadavg())
            proc.stdin.close()
    ratio = lambda key: statistics.median(r[key] / r["affjax_s"] for r in rounds)  # noqa: E731
    med = lambda key: statistics.median(r[key] for r in rounds)  # noqa: E731
    t = cfg.text
    return {"what": "Kimi-Audio LLM-side prefill, affjax vs the official MoonshotKimiaForCausalLM, CPU float32",
            "config": f"affjax.bench.kimi.BENCH_CONFIG: text d{t.hidden} x {t.layers}, {t.heads} heads, MLP "
                      f"{t.intermediate}, adaptor {cfg.adaptor_input_dim} -> {t.hidden}, vocab {t.vocab_size}, "
                      "no MIMO layers",
            "tokens": int(batch.valid[0].sum()), "speech_codes": int(official["continuous"].sum()), "batch": 1,
            "rounds": args.rounds, "torch_threads": args.threads, "xla": "default CPU client (its own thread pool)",
            "cpu_count": os.cpu_count(), "cpus_allowed": len(os.sched_getaffinity(0)),
            "load_average_1_5_15_before_after": load,
            "jax": jax.__version__, "torch": torch.__version__, "official side": shims,
            "last_logits_max_abs_diff": diff, "last_logits_max_abs": float(np.abs(theirs).max()),
            "first_call_s": {"affjax (compiles)": first, **{f"official {k}": v for k, v in official_first.items()}},
            "median_s": {k: med(k) for k in rounds[0]},
            "official_prefill_over_affjax": ratio("official_prefill_s"),
            "official_forward_over_affjax": ratio("official_forward_s"),
            "rounds_s": rounds}


def format_time(r: dict) -> str:
    m, load = r["median_s"], r["load_average_1_5_15_before_after"]
    lines = [f"{r['what']}: {r['config']}; {r['tokens']} tokens ({r['speech_codes']} speech codes), batch 1, "
             f"{r['rounds']} rounds, torch {r['torch_threads']} thread(s), {r['cpus_allowed']} CPU(s) allowed; "
             f"load average {load[0][0]:.1f} -> {load[1][0]:.1f}",
             f"last-position logits: max abs diff {r['last_logits_max_abs_diff']:.2e} (max abs "
             f"{r['last_logits_max_abs']:.2f}); CPU s / wall s (cores kept busy), median: affjax "
             f"{m['affjax_cpu_s'] / m['affjax_s']:.2f}, official prefill "
             f"{m['official_prefill_cpu_s'] / m['official_prefill_s']:.2f}",
             "| round | affjax s | official prefill s | ratio | official forward s | ratio |",
             "|---|---|---|---|---|---|"]
    for i, x in enumerate(r["rounds_s"], 1):
        a = x["affjax_s"]
        lines.append(f"| {i} | {a:.3f} | {x['official_prefill_s']:.3f} | {x['official_prefill_s'] / a:.2f}x | "
                     f"{x['official_forward_s']:.3f} | {x['official_forward_s'] / a:.2f}x |")
    lines.append(f"| median | {m['affjax_s']:.3f} | {m['official_prefill_s']:.3f} | "
                 f"{r['official_prefill_over_affjax']:.2f}x | {m['official_forward_s']:.3f} | "
                 f"{r['official_forward_over_affjax']:.2f}x |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--official", required=True, help="folder with the official Kimi-Audio modeling file")
    ap.add_argument("--glm4", help="a GLM-4-Voice checkout (speech_tokenizer/modeling_whisper.py)")
    ap.add_argument("--kimia-infer", help="a MoonshotAI/Kimi-Audio checkout (kimia_infer's log-mel code)")
    ap.add_argument("--pythonpath", help="put first on the official side's path (a transformers 4.x)")
    ap.add_argument("--time", action="store_true",
                    help="time the prefill against the official model instead of the check (see the docstring)")
    ap.add_argument("--rounds", type=int, default=7, help="--time: timed rounds (each runs both sides)")
    ap.add_argument("--threads", type=int, default=1, help="--time: PyTorch's threads")
    ap.add_argument("--out", help="--time: write the JSON here")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child(args)
        return 0
    if args.time:
        r = time_prefill(args)
        print(format_time(r))
        if args.out:
            Path(args.out).write_text(json.dumps(r, indent=1))
        return 0

    from affjax.testing import synth_speech_like

    rng = np.random.default_rng(SEED)
    with tempfile.TemporaryDirectory(prefix="kimi_official_") as tmp:
        work = Path(tmp)
        (work / "config.json").write_text(json.dumps(KIMI_CONFIG))
        inp = kimi_inputs(rng)
        np.savez(work / "kimi_inputs.npz", **inp)
        waves = [synth_speech_like(s, seed=i + 1) for i, s in enumerate(SECONDS)]
        np.savez(work / "glm4_inputs.npz", calibration=synth_speech_like(8.0, seed=1000),
                 **{f"wave{i}": w for i, w in enumerate(waves)})
        env = dict(os.environ)
        if args.pythonpath:
            env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.pythonpath, env.get("PYTHONPATH")]))
        cmd = [sys.executable, "-m", "affjax.bench.kimi_official", "--official", args.official, "--child", tmp]
        cmd += ["--glm4", args.glm4] if args.glm4 else []
        cmd += ["--kimia-infer", args.kimia_infer] if args.kimia_infer else []
        rc = subprocess.run(cmd, env=env).returncode
        if rc:
            print(f"error: the official side failed (exit status {rc}, above)", file=sys.stderr)
            return 1
        shims = json.loads((work / "shims.json").read_text())
        off = dict(np.load(work / "kimi_official.npz"))
        ours = ours_kimi(work, inp)
        report = {"official side": shims, "kimi": {}}
        for tag in ("float32", "float64"):
            row = {}
            for what in ("embeds", "text", "audio"):
                diffs = [float(np.abs(ours[f"{what}{i}"] - off[f"{tag}_{what}{i}"]).max()) for i in range(len(SECONDS))]
                row[f"{what} max abs diff"] = max(diffs)
            scale = max(float(np.abs(off[f"{tag}_text{i}"]).max()) for i in range(len(SECONDS)))
            row["text logits max abs"] = scale
            row["text argmax equal"] = all(np.array_equal(ours[f"text{i}"].argmax(-1), off[f"{tag}_text{i}"].argmax(-1))
                                           for i in range(len(SECONDS)))
            report["kimi"][f"official in {tag}"] = row
        report["kimi"]["compared"] = {"items": [int(inp[f"n{i}"]) for i in range(len(SECONDS))],
                                      "positions": [len(inp[f"sel{i}"]) for i in range(len(SECONDS))]}
        if args.glm4:
            g = dict(np.load(work / "glm4_official.npz"))
            got = ours_glm4(work, waves)
            rows = []
            for i, codes in enumerate(got):
                want, gap = g[f"codes{i}"], g[f"gap{i}"]
                same = len(codes) == len(want)
                differ = np.flatnonzero(codes != want) if same else np.arange(max(len(codes), len(want)))
                rows.append({"seconds": SECONDS[i], "codes": len(want), "ours": len(codes), "differ": int(differ.size),
                             "differ off ties (gap >= 1e-4)": int((gap[differ] >= 1e-4).sum()) if same else None,
                             "smallest gap": float(gap.min())})
            report["glm4 speech tokenizer"] = rows
        if args.kimia_infer:
            from transformers import WhisperFeatureExtractor

            from affjax.models.kimi_audio.inputs import window_features

            m = dict(np.load(work / "mel_official.npz"))
            fe = WhisperFeatureExtractor(feature_size=128)
            diffs = [float(np.abs(window_features(fe, w)[0][j] - m[f"mel{i}_{j}"]).max())
                     for i, w in enumerate(waves) for j in range(-(-len(w) // 480000))]
            report["log-mel"] = {"windows": len(diffs), "max abs diff": max(diffs),
                                 "official max abs": max(float(np.abs(v).max()) for v in m.values())}
        print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
