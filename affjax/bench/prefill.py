"""`affjax bench`: warm prefill of affjax against transformers' PyTorch eager model, same config,
same inputs, same machine, one run.

Config (about 70 M parameters): audio d384 x 4 layers, text d512 x 8 layers, vocab 32k; input: one
30 s clip (750 audio tokens) plus 40 text tokens per item. Prefill = audio encoder + projector +
all decoder layers (building the KV cache) + the LM head on the last position, on both sides.
Times are medians of --repeats warm runs; the first call (compilation) is reported apart. The
machine's matmul peak (2048-square float32) is measured in the same run on both frameworks.

`--model kimi-audio`: Kimi-Audio of the same widths (affjax.bench.kimi.BENCH_CONFIG: Whisper d384 x 4, text
d512 x 8, no MIMO layers) against transformers' WhisperEncoder + Qwen2Model composed as the official
code does (affjax/bench/kimi_torch.py); input: one 30 s window (375 tokens at 12.5 Hz) plus 40 text
tokens and the prompt's 6 control tokens per item.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affjax.models.layers import abstract_module
from affjax.models.qwen2_audio.inputs import Encoded, collate
from affjax.models.qwen2_audio.modeling import Qwen2Audio, Qwen2AudioConfig
from affjax.models.qwen2_audio.params import KEY_ALIASES, KEYS
from affjax.models.weights import KeyTable, iter_state_dict, load_streaming
from affjax.runtime.engine import Engine
from affjax.runtime.flops import lm_prefill_flops  # noqa: F401  (one implementation, re-exported here)

BENCH_CONFIG = {
    "model_type": "qwen2_audio",
    "audio_token_index": 31999,
    "audio_config": {"model_type": "qwen2_audio_encoder", "num_mel_bins": 80, "d_model": 384, "encoder_layers": 4,
                     "encoder_attention_heads": 6, "encoder_ffn_dim": 1536, "max_source_positions": 1500},
    "text_config": {"model_type": "qwen2", "vocab_size": 32000, "hidden_size": 512, "num_hidden_layers": 8,
                    "num_attention_heads": 8, "num_key_value_heads": 8, "intermediate_size": 1376,
                    "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False},
}


MODELS = ("qwen2-audio", "kimi-audio")


def prefill_flops(cfg, n_text: int, n_audio_tokens: int, n_frames: int) -> dict:
    """Analytic FLOPs of one item's prefill (2 per multiply-add): `text` with the full n x n
    attention square (the count of docs/pooling.md section 5), `text_causal` with the causal triangle only (the
    work a causal prefill needs; achieved GFLOP/s are quoted on it)."""
    a, t = cfg.audio, cfg.text
    d, f = a.d_model, n_frames // 2
    conv = 2 * (n_frames * a.num_mel_bins * d * 3 + f * d * d * 3)
    enc_layer = 2 * f * (4 * d * d + 2 * d * a.ffn_dim) + 2 * 2 * f * f * d
    # Kimi's adaptor: Linear(4 stacked frames -> D), Linear(D -> D); Qwen2-Audio's projector: d -> D
    adaptor_in = getattr(cfg, "adaptor_input_dim", 0)
    proj = 2 * n_audio_tokens * ((adaptor_in + t.hidden) * t.hidden if adaptor_in else d * t.hidden)
    n = n_text + n_audio_tokens
    text = lm_prefill_flops(t, [n] * t.layers, items=1)
    # the causal mask leaves n (n + 1) / 2 of the n x n scores to compute, not n^2
    causal_saving = t.layers * 2 * 2 * (n * n - n * (n + 1) // 2) * t.heads * t.head_dim
    return {"audio": conv + a.layers * enc_layer + proj, "text": text, "text_causal": text - causal_saving}


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def _best_time(fn, repeats: int) -> float:
    """The fastest of `repeats` warm runs (after one warm-up call)."""
    fn()
    return min(_timed(fn) for _ in range(repeats))


def matmul_peak(repeats: int = 5, n: int = 2048, dtype: str = "float32", device: str = "cpu") -> dict:
    """Best of 2 * repeats runs of an n-square matmul in `dtype` on each side (torch on `device`):
    a peak, so the fastest run."""
    import torch  # deferred: torch is optional (the torch extra)
    flops = 2 * n ** 3
    x = jnp.asarray(np.random.default_rng(0).standard_normal((n, n), np.float32), jnp.dtype(dtype))
    f = jax.jit(lambda a: a @ a)
    jt = _best_time(lambda: f(x).block_until_ready(), 2 * repeats)
    xt = torch.from_numpy(np.asarray(x, np.float32)).to(device=device, dtype=getattr(torch, dtype))
    tt = _best_time(lambda: _sync(xt @ xt), 2 * repeats)
    return {"xla_gflops": flops / jt / 1e9, "torch_gflops": flops / tt / 1e9, "n": n, "dtype": dtype}


def _sync(out=None):
    """Wait for the GPU's queued work (PyTorch on CUDA returns before the kernels finish)."""
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return out


def build_models(seed: int = 0, config: dict | None = None, dtype: str = "float32", device: str = "cpu"):
    """Random transformers model (`config`, default BENCH_CONFIG, in `dtype` on `device`) and the
    same weights in affjax (no disk round trip)."""
    # deferred: torch is optional, transformers heavy
    import torch
    from transformers import Qwen2AudioConfig as HFConfig
    from transformers import Qwen2AudioForConditionalGeneration

    config = config or BENCH_CONFIG
    torch.manual_seed(seed)
    hf_cfg = HFConfig(audio_config=config["audio_config"], text_config=config["text_config"],
                      audio_token_index=config["audio_token_index"])
    hf = Qwen2AudioForConditionalGeneration._from_config(hf_cfg, dtype=getattr(torch, dtype)).eval()
    cfg = Qwen2AudioConfig.from_hf(config)
    abstract = abstract_module(lambda rngs: Qwen2Audio(cfg, dtype=jnp.dtype(dtype), rngs=rngs))
    state = load_streaming(abstract, KeyTable(KEYS, KEY_ALIASES), iter_state_dict(hf.state_dict()),
                           dtype=jnp.dtype(dtype))
    return hf.to(device), nnx.merge(nnx.split(abstract)[0], state), cfg


def bench_inputs(cfg, batch: int, audio_seconds: float, text_tokens: int, seed: int = 0):
    """A batch of identical-shape items: text tokens around one audio placeholder run."""
    rng = np.random.default_rng(seed)
    frames = min(int(audio_seconds * 100), cfg.audio.mel_frames)
    n_audio = int(cfg.audio.output_lengths(frames))
    items = []
    for _ in range(batch):
        top = min(31000, cfg.audio_token_id, cfg.text.vocab_size)  # ordinary text ids
        head = rng.integers(0, top, text_tokens // 2)
        tail = rng.integers(0, top, text_tokens - text_tokens // 2)
        ids = np.concatenate([head, np.full(n_audio, cfg.audio_token_id), tail]).astype(np.int32)
        feats = rng.standard_normal((1, cfg.audio.num_mel_bins, cfg.audio.mel_frames)).astype(np.float32)
        items.append(Encoded(ids, feats, np.array([frames], np.int32)))
    return collate(items, batch_size=batch, audio_token_id=cfg.audio_token_id, out_frames_of=cfg.audio.output_lengths,
                   seq_len=len(items[0].ids))


def _torch_prefill(hf, batch, device: str, dtype: str):
    """transformers' Qwen2-Audio prefill of a batch (the LM head on the last position), as a call."""
    import torch
    feats = torch.from_numpy(batch.features).to(device=device, dtype=getattr(torch, dtype))
    fmask = torch.zeros(feats.shape[0], feats.shape[2], dtype=torch.long)
    for i, n in enumerate(batch.feature_lengths):
        fmask[i, :n] = 1
    fmask = fmask.to(device)
    ids = torch.from_numpy(batch.ids).long().to(device)

    def ref():
        with torch.inference_mode():
            h = hf.model(input_ids=ids, input_features=feats, feature_attention_mask=fmask,
                         attention_mask=torch.ones_like(ids), use_cache=True).last_hidden_state
            return hf.lm_head(h[:, -1])
    return ref


def run_bench(batches=(1, 4), repeats=5, audio_seconds=30.0, text_tokens=40, threads=2, torch_side=True,
              config: dict | None = None, dtype: str = "float32", model: str = "qwen2-audio") -> dict:
    """`model`: "qwen2-audio" or "kimi-audio"; `config`: an HF config dict of that family (default
    BENCH_CONFIG / affjax.bench.kimi.BENCH_CONFIG; `--ckpt-config qwen2-audio-7b` for an accelerator); both sides
    in `dtype`; PyTorch on CUDA when it sees a GPU."""
    import torch  # deferred: torch is optional (the torch extra)

    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    torch.set_num_threads(threads)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if model == "kimi-audio":
        from affjax.bench import kimi, kimi_torch  # deferred: kimi_torch imports torch
        hf, model_, cfg = kimi_torch.build(config or kimi.BENCH_CONFIG, 0, dtype, device)
        make_inputs, torch_call = kimi.inputs, kimi_torch.prefill_call
    else:
        hf, model_, cfg = build_models(config=config, dtype=dtype, device=device)
        make_inputs, torch_call = bench_inputs, _torch_prefill
    peak = matmul_peak(repeats, dtype=dtype, device=device)
    engine = Engine(model_)
    a, t = cfg.audio, cfg.text
    results = {"model": model,
               "config": f"audio d{a.d_model}x{a.layers}, text d{t.hidden}x{t.layers}, vocab {t.vocab_size}, {dtype}",
               "device": str(jax.devices()[0]), "torch_device": device,
               "params": int(sum(p.numel() for p in hf.parameters())),
               "audio_seconds": audio_seconds, "text_tokens": text_tokens, "repeats": repeats,
               "torch_threads": threads, "machine": platform.processor() or platform.machine(),
               "cpu_count": os.cpu_count(), "jax": jax.__version__, "torch": torch.__version__,
               "matmul_peak": peak, "rows": []}
    for b in batches:
        batch = make_inputs(cfg, b, audio_seconds, text_tokens)
        n_audio = int((batch.span[0] > 0).sum())
        fl = prefill_flops(cfg, int(batch.valid[0].sum()) - n_audio, n_audio, cfg.audio.mel_frames)
        flops = b * (fl["audio"] + fl["text"])
        flops_causal = b * (fl["audio"] + fl["text_causal"])

        def ours():
            out = engine.prefill(batch, extra=0)
            jax.block_until_ready((out.logits, out.caches))

        first = _timed(ours)
        runs, truns = [], []
        if torch_side:
            call = torch_call(hf, batch, device, dtype)

            def ref():
                _sync(call())

            ref()  # warm-up
        # round-robin: each round times both sides back to back, so a slow spell of this shared
        # machine hits both; the speed-up is the median of the per-round ratios
        for _ in range(repeats):
            runs.append(_timed(ours))
            if torch_side:
                truns.append(_timed(ref))
        med = statistics.median(runs)
        row = {"batch": b, "tokens_per_item": int(batch.valid[0].sum()), "gflop": flops / 1e9,
               "gflop_causal": flops_causal / 1e9,
               "affjax_first_call_s": first, "affjax_compile_s": first - med, "affjax_median_s": med,
               "affjax_runs_s": runs, "affjax_gflops": flops_causal / med / 1e9,
               "affjax_pct_of_xla_peak": 100 * flops_causal / med / 1e9 / peak["xla_gflops"]}
        if torch_side:
            tmed = statistics.median(truns)
            row.update(torch_median_s=tmed, torch_runs_s=truns, torch_gflops=flops_causal / tmed / 1e9,
                       torch_pct_of_torch_peak=100 * flops_causal / tmed / 1e9 / peak["torch_gflops"],
                       speedup_vs_torch=statistics.median(t / a for t, a in zip(truns, runs)))
        results["rows"].append(row)
    return results


def format_bench(r: dict) -> str:
    p = r["matmul_peak"]
    lines = [f"prefill bench ({r.get('model', 'qwen2-audio')}): {r['config']} ({r['params'] / 1e6:.1f} M params), {r['audio_seconds']:.0f} s audio "
             f"+ {r['text_tokens']} text tokens, median of {r['repeats']}; jax {r['jax']}, torch {r['torch']} "
             f"({r['torch_threads']} threads)",
             f"matmul peak ({p.get('n', 2048)}^2 {p.get('dtype', 'float32')}, best run): XLA {p['xla_gflops']:.0f} GFLOP/s, "
             f"PyTorch {p['torch_gflops']:.0f} GFLOP/s",
             "GFLOP: causal count (full-square count in brackets); GFLOP/s on the causal count; speed-up: median "
             "of per-round ratios (both sides timed back to back each round)",
             "| batch | GFLOP | affjax s | affjax GFLOP/s (% XLA peak) | compile s | PyTorch s | PyTorch GFLOP/s | affjax speed-up |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        t = (f"{row['torch_median_s']:.3f} | {row['torch_gflops']:.0f} | {row['speedup_vs_torch']:.2f}x"
             if "torch_median_s" in row else "- | - | -")
        lines.append(f"| {row['batch']} | {row['gflop_causal']:.1f} ({row['gflop']:.1f}) | {row['affjax_median_s']:.3f} | "
                     f"{row['affjax_gflops']:.0f} ({row['affjax_pct_of_xla_peak']:.0f} %) | "
                     f"{row['affjax_compile_s']:.1f} | {t} |")
    return "\n".join(lines)


def main_bench(args) -> int:
    from affjax.runtime.plan import load_hf_config

    config = load_hf_config(args.ckpt_config) if getattr(args, "ckpt_config", None) else None
    r = run_bench(tuple(args.batch), args.repeats, args.audio_seconds, args.text_tokens, args.threads,
                  torch_side=not args.no_torch, config=config, dtype=getattr(args, "dtype", "float32"),
                  model=getattr(args, "model", "qwen2-audio"))
    print(format_bench(r))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(r, f, indent=1)
    return 0
