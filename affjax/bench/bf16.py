"""`affjax bench-bf16`: the bfloat16 gate, in the MaxText style.

TPUs run bfloat16. The gate loads the same weights twice, in float32 and in bfloat16 (parameters and
compute), feeds both the same long teacher-forced sequence, and compares the next-token
distributions at every position:

- KL(p_float32 || p_bfloat16) in nats, mean and worst over the positions;
- top-1 agreement: the share of positions where both pick the same next token.

Sequences: for Whisper, each LibriVox clip's prompt plus the float32 model's own greedy transcript
(and the WER of both dtypes' greedy transcripts beside it); for a Qwen2-architecture decoder with real
weights (SmolLM2-135M, the GGUF asset), a long English text (several hundred tokens, so RoPE runs far
from position 0); for a converted Qwen2-Audio checkpoint, long prompts around clips of speech-like
audio (on random test weights the distributions are nearly flat, so only the KL is meaningful there).

Run: ``affjax bench-bf16 --whisper tiny.en base --smollm2 [--ckpt DIR] [--out JSON]``.
"""

from __future__ import annotations

import json
import sys

import jax
import jax.numpy as jnp
import numpy as np

GATE = {"kl_mean_max": 0.01, "top1_min": 0.95}


def compare(logits32, logits16, mask) -> dict:
    """KL(p32 || p16) per position (nats) and top-1 agreement over the positions where `mask`."""
    a = np.asarray(logits32, np.float64)[np.asarray(mask, bool)]
    b = np.asarray(logits16, np.float64)[np.asarray(mask, bool)]
    if not len(a):
        raise ValueError("no position to compare")
    la = a - a.max(-1, keepdims=True)
    la -= np.log(np.exp(la).sum(-1, keepdims=True))
    lb = b - b.max(-1, keepdims=True)
    lb -= np.log(np.exp(lb).sum(-1, keepdims=True))
    kl = (np.exp(la) * (la - lb)).sum(-1)
    return {"positions": int(len(a)), "kl_mean": float(kl.mean()), "kl_max": float(kl.max()),
            "top1": float((a.argmax(-1) == b.argmax(-1)).mean())}


def verdict(r: dict, gate=GATE) -> bool:
    return r["kl_mean"] <= gate["kl_mean_max"] and r["top1"] >= gate["top1_min"]


# ----------------------------------------------------------------------------------------------
# Whisper (real weights: the installed CTranslate2 models)


def whisper_case(models: dict, clips: list[tuple[str, np.ndarray]], max_new_tokens: int = 96) -> dict:
    """`models`: {"float32": (model, processor), "bfloat16": (model, processor)}; `clips`: [(reference
    text, float32 waveform at 16 kHz)]. Teacher-forced along the float32 greedy transcripts."""
    from affjax.eval.whisper import corpus_wer, make_normalizer
    from affjax.models.whisper.decoding import encode, prompt_ids, transcribe, whisper_features

    m32, proc = models["float32"]
    waves = [w for _, w in clips]
    out32 = transcribe(m32, proc, waves, max_new_tokens=max_new_tokens, batch_size=len(waves))
    prompt = prompt_ids(proc.tokenizer, m32.cfg)
    eos = m32.cfg.eos_token_id
    rows = [prompt + t + [eos] for t in out32.tokens]
    T = max(map(len, rows))
    toks = np.full((len(rows), T), eos, np.int32)
    mask = np.zeros((len(rows), T), bool)  # positions predicting a transcript token or the eos
    for i, r in enumerate(rows):
        toks[i, :len(r)] = r
        mask[i, len(prompt) - 1:len(r) - 1] = True
    feats = whisper_features(proc, waves, len(waves), m32.cfg)
    logits, texts = {}, {}
    for dtype, (m, p) in models.items():
        enc = encode(m, feats)
        logits[dtype] = np.asarray(jax.jit(lambda d, t, e: d(t, e))(m.decoder, jnp.asarray(toks), enc), np.float32)
        texts[dtype] = out32.texts if dtype == "float32" else transcribe(
            m, p, waves, max_new_tokens=max_new_tokens, batch_size=len(waves)).texts
    norm, _ = make_normalizer(proc.tokenizer)
    refs = [norm(ref) for ref, _ in clips]
    r = compare(logits["float32"], logits["bfloat16"], mask)
    r["wer"] = {d: corpus_wer(refs, [norm(t) for t in texts[d]]) for d in models}
    r["sequences"] = len(rows)
    return r


def whisper_gate(name: str, n_clips: int = 5, max_new_tokens: int = 96, log=print) -> dict:
    from affjax.data.assets import librivox_items
    from affjax.data.audio import load_audio
    from affjax.eval.whisper import load_installed

    models = {d: load_installed(f"whisper-{name}", dtype=d, log=log)[:2] for d in ("float32", "bfloat16")}
    clips = [(it["text"], load_audio(it["audio"])) for it in librivox_items()[:n_clips]]
    return whisper_case(models, clips, max_new_tokens)


# ----------------------------------------------------------------------------------------------
# Qwen2-architecture decoders


def text_case(models: dict, ids: np.ndarray) -> dict:
    """`models`: {dtype: Qwen2ForCausalLM}; `ids`: [B, T] token ids, every position compared."""
    ids = jnp.asarray(ids, jnp.int32)
    valid = jnp.ones(ids.shape, bool)
    logits = {d: np.asarray(jax.jit(lambda m, i, v: m(i, v))(m, ids, valid), np.float32) for d, m in models.items()}
    return compare(logits["float32"], logits["bfloat16"], np.ones(ids.shape, bool))


def smollm2_gate(sentences: int = 24) -> dict:
    """SmolLM2-135M (real weights, the GGUF asset) on a long English text: the project's TTS
    sentences (affjax/data/tts_texts.jsonl) as one passage, several hundred tokens."""
    from affjax.data.assets import smollm2_gguf
    from affjax.data.tts import tts_texts
    from affjax.models.qwen2.gguf import gguf_tokenizer, load_gguf_models

    path = smollm2_gguf()
    tok = gguf_tokenizer(path)
    ids = np.asarray([tok.encode(" ".join(t["text"] for t in tts_texts(sentences))).ids], np.int32)
    r = text_case(load_gguf_models(path, ("float32", "bfloat16")), ids)
    r["sequences"] = 1
    return r


def _full_logits(model, *inputs):
    """Qwen2-Audio's logits at every position of a batch (jitted by the caller)."""
    from affjax.runtime.engine import hidden_states

    return model.language_model.logits(hidden_states(model, *inputs))


def qwen2_audio_gate(ckpt: str, n_items: int = 3, words: int = 300) -> dict:
    """A converted Qwen2-Audio checkpoint: long prompts around 5-25 s of speech-like audio."""
    from affjax.eval.lslm import load_for_inference
    from affjax.models.qwen2_audio.inputs import collate, encode
    from affjax.testing import long_prompt, synth_speech_like

    logits, mask = {}, None
    for dtype in ("float32", "bfloat16"):
        model, cfg, processor, _, pad = load_for_inference(ckpt, dtype=dtype)
        enc = [encode(processor, long_prompt(words + 37 * i, seed=i), [synth_speech_like(5.0 + 10 * i, seed=i)])
               for i in range(n_items)]
        batch = collate(enc, batch_size=n_items, audio_token_id=cfg.audio_token_id,
                        out_frames_of=cfg.audio.output_lengths, pad_id=pad)
        arrays = map(jnp.asarray, (batch.ids, batch.valid, batch.span, batch.audio_index, batch.features,
                                   batch.feature_lengths))
        logits[dtype] = np.asarray(jax.jit(_full_logits)(model, *arrays), np.float32)
        mask = np.asarray(batch.valid, bool) & (np.asarray(batch.span) == 0)  # text positions
    r = compare(logits["float32"], logits["bfloat16"], mask)
    r["sequences"] = n_items
    return r


# ----------------------------------------------------------------------------------------------
# command line


def format_gate(results: dict, gate=GATE) -> str:
    lines = [f"bf16 gate: KL(p_float32 || p_bfloat16) mean <= {gate['kl_mean_max']} nats and top-1 agreement "
             f">= {100 * gate['top1_min']:.0f} % over every position", "",
             "| model | sequences | positions | KL mean (nats) | KL max | top-1 agreement | WER float32 / bfloat16 | gate |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        wer = r.get("wer")
        w = f"{100 * wer['float32']:.1f} % / {100 * wer['bfloat16']:.1f} %" if wer else "-"
        lines.append(f"| {name} | {r['sequences']} | {r['positions']} | {r['kl_mean']:.2e} | {r['kl_max']:.2e} | "
                     f"{100 * r['top1']:.1f} % | {w} | {'pass' if verdict(r, gate) else 'FAIL'} |")
    return "\n".join(lines)


def main_bench_bf16(args) -> int:
    results = {}
    for name in args.whisper:
        results[f"whisper-{name}"] = whisper_gate(name, args.clips)
    if args.smollm2:
        results["smollm2-135m (qwen2 decoder)"] = smollm2_gate()
    for ckpt in args.ckpt:
        results[f"qwen2-audio {ckpt}"] = qwen2_audio_gate(ckpt)
    if not results:
        print("error: nothing to gate (give --whisper NAME, --smollm2 or --ckpt DIR)", file=sys.stderr)
        return 1
    print(format_gate(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"gate": GATE, "jax": jax.__version__, "device": str(jax.devices()[0]),
                       "command": " ".join(["affjax bench-bf16"] + [a for a in sys.argv[1:] if a != "bench-bf16"]), "results": results}, f, indent=1)
    return 0 if all(verdict(r) for r in results.values()) else 3


if __name__ == "__main__":
    from affjax.cli import main

    sys.exit(main(["bench-bf16", *sys.argv[1:]]))
