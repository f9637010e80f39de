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

from affjax.models.layers import abstract_module
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
    "audio (qwen2_audio): one 30 s clip per batch row, max_source_positions frames after the conv "
    "stem; the encoder runs before the decoder, so the activation peak is the larger of the two, "
    "plus the projected audio tokens kept for the decoder",
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


# ----------------------------------------------------------------------------------------------
# Building the model abstractly


def _configs(hf_config: dict):
    """(model_type, audio EncoderConfig or None, TextConfig, builder) for an HF config dict."""
    mt = hf_config.get("model_type")
    if mt == "qwen2_audio":
        cfg = Qwen2AudioConfig.from_hf(hf_config)
        return mt, cfg.audio, cfg.text, lambda rngs: Qwen2Audio(cfg, rngs=rngs)
    if mt in ("qwen2", "llama"):
        cfg = TextConfig.from_hf(hf_config)
        return mt, None, cfg, lambda rngs: Qwen2ForCausalLM(cfg, rngs=rngs)
    raise ValueError(f"model_type {mt!r}: plan knows qwen2_audio, qwen2 and llama")


def _part(path: tuple) -> str:
    if path[0] == "audio_tower":
        return "audio_tower"
    if path[0] == "multi_modal_projector":
        return "projector"
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
    counts = {"audio_tower": 0, "projector": 0, "language_model": 0, "embeddings": 0, "lm_head": 0}
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
    mt = hf_config.get("model_type")
    if mt == "qwen2_audio":
        return Qwen2AudioConfig.from_hf(hf_config)
    return TextConfig.from_hf(hf_config)


def param_bytes_per_chip(hf_config: dict, *, model: int, dtype_bytes: int) -> int:
    """Parameter bytes one chip holds on a mesh with `model` chips on the model axis, placed by
    affjax.runtime.sharding's rules (what `sharding.load` restores onto each chip)."""
    return _param_elements_per_chip(json.dumps(hf_config, sort_keys=True), model) * dtype_bytes


def param_counts(hf_config: dict) -> dict[str, int]:
    """Parameters per part (audio_tower, projector, language_model = decoder layers and final norm,
    embeddings, lm_head; 0 where absent) plus "total", from the abstractly built model."""
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


def _encoder_activations(a, t, *, clips: int, nbytes: int, model: int = 1) -> dict[str, int]:
    f = a.max_source_positions
    d = a.d_model
    stem = clips * (a.num_mel_bins + d) * 2 * f * nbytes  # mel input + conv1 output at 2f frames
    residual = 2 * clips * f * d * nbytes
    attn_split = model if a.heads % model == 0 else 1
    attn = 2 * clips * a.heads * f * f * 4 // attn_split + 4 * clips * f * d * nbytes // attn_split
    mlp = clips * f * a.ffn_dim * nbytes // model
    out = clips * a.out_frames * t.hidden * nbytes  # projected audio tokens, kept for the decoder
    return {"stem": stem, "residual": residual, "attention": attn, "mlp": mlp, "audio_tokens": out,
            "peak": max(stem, residual + max(attn, mlp)) + out}


def _activations(audio, text, *, batch: int, seq_len: int, nbytes: int, model: int = 1) -> dict:
    dec = _decoder_activations(text, batch=batch, seq_len=seq_len, nbytes=nbytes, model=model)
    out = {"decoder": dec, "peak": dec["peak"]}
    if audio is not None:
        enc = _encoder_activations(audio, text, clips=batch, nbytes=nbytes, model=model)
        out["encoder"] = enc
        out["peak"] = max(enc["peak"], dec["peak"] + enc["audio_tokens"])
    return out


def _meshes(chips: int) -> list[tuple[int, int]]:
    return [(chips // m, m) for m in range(1, chips + 1) if chips % m == 0]


def topology_plan(hf_config: dict, name: str, *, batch: int, seq_len: int,
                  dtypes=("float32", "bfloat16"), headroom: float = HEADROOM) -> dict:
    """Per-chip bytes on every (data, model) mesh of a TPU slice and, per dtype, the smallest model
    axis that fits with `headroom` to spare."""
    if name not in TOPOLOGIES:
        raise ValueError(f"unknown topology {name!r}; known: {', '.join(TOPOLOGIES)}")
    topo = TOPOLOGIES[name]
    _, audio, text, _ = _configs(hf_config)
    budget = int((1 - headroom) * topo["hbm"])
    rows, choice = [], {}
    for dtype in dtypes:
        nb = DTYPE_BYTES[dtype]
        for data, model in _meshes(topo["chips"]):
            ok_heads = text.heads % model == 0 and text.kv_heads % model == 0
            local = -(-batch // data)
            params = param_bytes_per_chip(hf_config, model=model, dtype_bytes=nb)
            kv = kv_cache_bytes(text, batch=local, length=seq_len, dtype_bytes=nb) // model
            act = _activations(audio, text, batch=local, seq_len=seq_len, nbytes=nb, model=model)["peak"]
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
         topology=None) -> dict:
    """Memory plan of one (batch, seq_len) prefill for an HF config dict (qwen2_audio, qwen2, llama).

    Returns {"model_type", "geometry", "params" (count per part and total), "param_bytes",
    "kv_cache", "activations", "total" (bytes per dtype on one device), "topologies" (per-chip
    bytes of every mesh and the mesh picked, for each topology asked: a name, several, or "all"),
    "topology" (the first of them), "assumptions"}. seq_len counts every decoder position (text
    plus audio tokens)."""
    for d in dtypes:
        if d not in DTYPE_BYTES:
            raise ValueError(f"unknown dtype {d!r}; known: {', '.join(DTYPE_BYTES)}")
    mt, audio, text, _ = _configs(hf_config)
    counts = param_counts(hf_config)
    geometry = {"text": {"vocab": text.vocab_size, "hidden": text.hidden, "layers": text.layers,
                         "heads": text.heads, "kv_heads": text.kv_heads, "head_dim": text.head_dim,
                         "intermediate": text.intermediate, "tied_embeddings": text.tie_embeddings}}
    if audio is not None:
        geometry["audio"] = {"mel": audio.num_mel_bins, "d_model": audio.d_model, "layers": audio.layers,
                             "heads": audio.heads, "ffn": audio.ffn_dim,
                             "max_source_positions": audio.max_source_positions,
                             "audio_tokens_per_clip": audio.out_frames}
    out = {"model_type": mt, "geometry": geometry, "batch": batch, "seq_len": seq_len, "dtypes": list(dtypes),
           "params": counts, "param_bytes": {}, "kv_cache": {"per_token_bytes": {}, "bytes": {}},
           "activations": {}, "total": {}, "assumptions": list(ASSUMPTIONS)}
    for d in dtypes:
        nb = DTYPE_BYTES[d]
        out["param_bytes"][d] = counts["total"] * nb
        out["kv_cache"]["per_token_bytes"][d] = kv_cache_bytes(text, batch=1, length=1, dtype_bytes=nb)
        out["kv_cache"]["bytes"][d] = kv_cache_bytes(text, batch=batch, length=seq_len, dtype_bytes=nb)
        out["activations"][d] = _activations(audio, text, batch=batch, seq_len=seq_len, nbytes=nb)
        out["total"][d] = out["param_bytes"][d] + out["kv_cache"]["bytes"][d] + out["activations"][d]["peak"]
    names = topology_names(topology)
    if names:
        out["topologies"] = [topology_plan(hf_config, n, batch=batch, seq_len=seq_len, dtypes=dtypes) for n in names]
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
                     f"ffn {a['ffn']}, {a['audio_tokens_per_clip']} tokens per 30 s clip")
    lines += ["", f"{'part':<16}{'parameters':>16}" + "".join(f"{d:>16}" for d in dts)]
    for part, n in result["params"].items():
        if n or part == "total":
            lines.append(f"{part:<16}{n:>16,}" + "".join(f"{_gib(n * DTYPE_BYTES[d]):>16}" for d in dts))
    lines += ["", f"batch {result['batch']} x length {result['seq_len']} (prefill, one device)",
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
    """'qwen2-audio-7b', 'qwen2-audio-tiny', a config.json path, or a checkpoint folder holding config.json."""
    if spec.lower() in ("qwen2-audio-7b", "qwen2_audio_7b"):
        return copy.deepcopy(QWEN2_AUDIO_7B_CONFIG)
    if spec.lower() in ("qwen2-audio-tiny", "qwen2_audio_tiny"):
        return tiny_config()
    p = Path(spec)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise FileNotFoundError(f"no config.json at {p} (give a config.json, a checkpoint folder, 'qwen2-audio-7b' or 'qwen2-audio-tiny')")
    return json.loads(p.read_text())


def main_plan(args) -> int:
    """`affjax plan`: the full plan for the first (batch, length), then a grid of totals."""
    try:
        cfg = load_hf_config(args.ckpt_config)
        batches, lengths = list(args.batch) or [1], list(args.length) or [1024]
        first = plan(cfg, batch=batches[0], seq_len=lengths[0], topology=args.topology)
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
            r = plan(cfg, batch=b, seq_len=n, topology=topos or None)
            row = f"{b:>6}{n:>8}" + "".join(f"{_gib(r['kv_cache']['bytes'][d]):>18}{_gib(r['total'][d]):>18}"
                                            for d in dts)
            row += "".join(f"{(str(c['model']) if (c := t['choice'][d]) else 'none'):>20}"
                           for t in r.get("topologies", []) for d in dts)
            print(row)
    print("\nassumptions:\n" + "\n".join(f"  - {a}" for a in first["assumptions"]))
    return 0
