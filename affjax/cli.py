"""The `affjax` command line."""

from __future__ import annotations

import argparse
import json
import sys


def _add_pooling(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("Affinity Pooling")
    g.add_argument("--pooling", default=None,
                   help="preset (none, input, dap-conservative, dap-aggressive) or stages "
                        "'LAYER:tau=F,window=N[,weighted];...', e.g. '0:tau=0.8,window=1;29:tau=0.7,window=3'")
    g.add_argument("--positions", default="first", choices=("first", "mean", "reindex"),
                   help="position ids of merged tokens (default: first)")
    g.add_argument("--proportional", action="store_true",
                   help="add log(group size) to the attention logits of merged keys")
    g.add_argument("--pool-mode", default="bucketed", choices=("bucketed", "fixed"),
                   help="bucketed: exact thresholds, one compile per bucket; fixed: one compiled prefill "
                        "with a retention cap (--capacity)")
    g.add_argument("--capacity", type=_capacity, default=None,
                   help="fixed mode: slots per audio span as a fraction of its tokens (e.g. 0.5), or one "
                        "fraction per stage, each of the span's tokens entering that stage (e.g. 0.786,0.19)")
    g.add_argument("--no-xla-cost", action="store_true",
                   help="pooled runs: skip the XLA-measured FLOPs ratio (it compiles the unpooled programs "
                        "of each batch shape once, for cost analysis only)")


def _capacity(text: str):
    parts = [p.strip() for p in text.split(",")]
    try:
        vals = tuple(float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"capacity {text!r}: expected a number or numbers separated by ','")
    return vals[0] if len(vals) == 1 else vals


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ckpt", required=True, help="converted checkpoint directory (checkpoints_convert/convert.py)")
    p.add_argument("--manifest", required=True, help="JSONL: id, audio, prompt[, continuation]")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"),
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--mesh", default=None,
                   help="device mesh, e.g. data=4,model=2 (-1: the rest; default: every device on data); "
                        "batch sizes are padded to a multiple of data (see `affjax plan --topology`)")
    _add_run(p, schedule_default="in-order")
    _add_pooling(p)


def _add_run(p: argparse.ArgumentParser, schedule_default: str) -> None:
    """Options of every job that goes through the runner (affjax.eval.runner): resume, scheduling."""
    p.add_argument("--schedule", default=None, choices=("two-pass", "in-order"),
                   help="Qwen2-Audio / Kimi-Audio: encode first, then batch the language model by pooled length "
                        "(two-pass), "
                        f"or batches in manifest order (default: {schedule_default})")
    p.add_argument("--window", type=int, default=256, help="items per scheduling window")
    p.add_argument("--limit", type=int, default=None, help="only the first N items")
    p.add_argument("--retry-errors", action="store_true", help="on resume, run the items that failed before again")
    p.add_argument("--restart", action="store_true",
                   help="delete the results of an earlier run at --out and start over (a rerun resumes by default, "
                        "and is refused when its inputs or settings differ)")
    p.add_argument("--no-compile-cache", action="store_true", help="disable JAX's persistent compilation cache")
    p.add_argument("--no-progress", action="store_true")


def _run_job(args) -> int:
    """score / generate / eval through the one runner; one line and exit 1 on bad options or input,
    on an empty manifest and on a run in which every item failed."""
    # deferred: --help and option parsing must not import jax (the runner validates before loading it)
    from affjax.data.assets import AssetMissing
    from affjax.eval.runner import JobConfig, enable_compile_cache, format_summary, run_eval

    file_job = args.cmd in ("score", "generate")
    cfg = JobConfig(task=args.cmd if file_job else args.task, ckpt=args.ckpt, model=getattr(args, "model", None),
                    manifest=args.manifest, data=getattr(args, "data", None), out=args.out,
                    batch_size=args.batch_size, max_new_tokens=getattr(args, "max_new_tokens", 64),
                    pooling=args.pooling, positions=args.positions, proportional=args.proportional,
                    pool_mode=args.pool_mode, capacity=args.capacity, dtype=args.dtype,
                    normalizer=getattr(args, "normalizer", "english"),
                    drop_padding=getattr(args, "drop_padding", False), schedule=args.schedule, window=args.window,
                    retry_errors=args.retry_errors, restart=args.restart, limit=args.limit, mesh=args.mesh,
                    xla_cost=not getattr(args, "no_xla_cost", False), progress=not args.no_progress,
                    oracle=getattr(args, "oracle", None), alignment=getattr(args, "alignment", None))
    if not args.no_compile_cache:
        enable_compile_cache()
    try:
        summary = run_eval(cfg)
    except (FileNotFoundError, ValueError, AssetMissing) as e:  # bad options, inputs, checkpoint, assets
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=1) if file_job else format_summary(summary))
    runs = summary.get("runs") or [summary]
    if "ok" in runs[0] and all(r["ok"] == 0 for r in runs):
        print(f"error: every item failed ({runs[0]['errors']} errors; the causes are in the results)", file=sys.stderr)
        return 1
    return 0


def _names(text: str) -> tuple[str, ...]:
    return tuple(p.strip() for p in text.split(",") if p.strip())


def _layers(text: str) -> tuple[int, ...]:
    out = []
    try:
        for part in text.split(","):
            lo, _, hi = part.partition("-")
            out += list(range(int(lo), int(hi or lo) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers {text!r}: expected e.g. 0-29 or 20,25") from None
    return tuple(out)


def _range(text: str) -> tuple[float, float]:
    try:
        lo, hi = (float(p) for p in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"range {text!r}: expected LO,HI") from None
    return lo, hi


def _run_train(args) -> int:
    # deferred: option parsing must not import jax
    from affjax.eval.runner import enable_compile_cache

    if not getattr(args, "no_compile_cache", False):
        enable_compile_cache()
    try:
        if args.cmd == "export":
            from affjax.train.carry import write_carry
            from affjax.train.export import export_run, run_trainer
            if args.out is None and args.carry is None:
                raise ValueError("export needs --out CKPT, --carry FILE or both")
            if args.out is not None:
                export_run(args.run, args.out)
            if args.carry is not None:
                tr = run_trainer(args.run)
                print(f"carry of step {tr.step} -> {write_carry(tr, args.carry)}")
            return 0
        from affjax.train.trainer import TrainConfig, run
        cfg = TrainConfig(
            ckpt=args.ckpt, manifest=args.manifest, out=args.out, steps=args.steps, trainable=args.trainable,
            lora_rank=args.lora_rank, lora_alpha=args.lora_alpha, lora_layers=args.lora_layers, lr=args.lr,
            warmup=args.warmup, weight_decay=args.weight_decay, clip=args.clip, batch_size=args.batch_size,
            accumulate=args.accumulate, seed=args.seed, pooling=args.pooling, positions=args.positions,
            proportional=args.proportional, tau_range=args.tau_range, prompt=args.prompt,
            save_every=args.save_every, keep=args.keep, log_every=args.log_every, eval_every=args.eval_every,
            eval_manifest=args.eval_manifest, eval_items=args.eval_items, mesh=args.mesh, cache_dir=args.cache_dir,
            carry=args.carry, restart=args.restart, progress=not args.no_progress)
        cfg.validate()
        out = run(cfg)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(json.dumps(out))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="affjax", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)

    p = sub.add_parser("score", help="log-likelihood of each item's continuation")
    _add_common(p)
    p = sub.add_parser("generate", help="greedy decoding")
    _add_common(p)
    p.add_argument("--max-new-tokens", type=int, default=64)

    p = sub.add_parser("plan", help="parameter / KV-cache memory plan from a config.json (no weights needed)")
    p.add_argument("--ckpt-config", required=True,
                   help="an HF config.json, a checkpoint directory, or 'qwen2-audio-7b' / 'kimi-audio-7b' for "
                        "the real geometry")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 4, 8])
    p.add_argument("--audio-seconds", type=float, default=30.0,
                   help="audio per row (Kimi-Audio takes consecutive 30 s windows; Qwen2-Audio cuts at 30 s)")
    p.add_argument("--length", type=int, nargs="*", default=[1024, 2048, 4096])
    p.add_argument("--topology", default=None, nargs="+",
                   help="TPU topologies: v4-8, v5e-8, v5p-8 (several, or 'all'): per-chip bytes of each "
                        "(data, model) mesh and the mesh picked; with --aot one topology, e.g. v5e:2x4")
    g = p.add_argument_group("--aot: compile every job program with the real TPU compiler (needs the tpu extra)")
    g.add_argument("--aot", action="store_true", help="compile for --topology instead of the analytic plan")
    g.add_argument("--mesh", default=None, help="data=D,model=M over the topology's chips (default: all on data)")
    g.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    g.add_argument("--pooling", default=None, help="a preset or setting (see `affjax eval --help`); none: unpooled")
    g.add_argument("--retention", type=float, nargs="+", default=None,
                   help="fixed-capacity retention per stage, or one for every stage (sizes the stage buffers); "
                        "default 0.5 per stage")
    g.add_argument("--batch-size", type=int, default=1)
    g.add_argument("--text-tokens", type=int, default=40)
    g.add_argument("--max-new-tokens", type=int, default=128)
    g.add_argument("--score-tokens", type=int, default=0, help="> 0: a scoring job (continuations of this length)")
    g.add_argument("--depth", default="full", choices=("full", "two-point"),
                   help="full: every program at the real depth (exact); two-point: compile 1 and 2 layers per group "
                        "and extrapolate (FLOPs exact, peak bytes off by the on-chip memory's changes; docs/tpu.md)")
    g.add_argument("--json", default=None, metavar="OUT", help="write the report as JSON")
    g.add_argument("--dump-hlo", default=None, metavar="DIR", help="write each compiled program's HLO text here")
    g.add_argument("--max-batch", action="store_true",
                   help="find the largest batch that fits per chip by compiling (starting from --batch-size); the "
                        "report is the plan at that batch")
    g.add_argument("--attention", default="xla", choices=("xla", "auto"),
                   help="prefill attention to compile: xla (every FLOP counted) or auto (the Pallas splash kernel "
                        "a TPU job runs: its memory, but its FLOPs are invisible to the compiler's count)")
    g.add_argument("--vmem-mib", type=int, default=None, metavar="MIB",
                   help="cap the on-chip vector memory (VMEM) the compiler may use: its peak counts VMEM buffers "
                        "beside HBM, so 16 gives nearly HBM alone (default: the chip's own, 128 MiB on v5e)")
    g.add_argument("--hbm-budget", type=float, default=None, metavar="GIB",
                   help="with --max-batch: GiB per chip the job may use (default: all of the chip's HBM)")

    p = sub.add_parser("bench", help="prefill benchmark: affjax vs transformers (PyTorch eager) on one config")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--audio-seconds", type=float, default=30.0)
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    p.add_argument("--no-torch", action="store_true", help="skip the PyTorch side")
    p.add_argument("--ckpt-config", default=None, metavar="CONFIG",
                   help="model geometry ('qwen2-audio-7b', an HF config.json, ...; random weights); default: the "
                        "bench's 70 M model")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="both sides' dtype")
    p.add_argument("--model", default="qwen2-audio", choices=("qwen2-audio", "kimi-audio"),
                   help="kimi-audio: Kimi-Audio of the same widths against transformers' modules composed as the "
                        "official code does (affjax/bench/kimi_torch.py)")

    p = sub.add_parser("bench-pooling", help="prefill FLOPs / time to first token / memory: unpooled vs input, "
                                              "deep and DAP pooling at the paper's retention (32-layer random model)")
    p.add_argument("--batch", type=int, nargs="*", default=[1, 4])
    p.add_argument("--repeats", type=int, default=5, help="warm runs per method (medians)")
    p.add_argument("--audio-seconds", type=float, default=30.0)
    p.add_argument("--text-tokens", type=int, default=40)
    p.add_argument("--exact-length", action="store_true",
                   help="sequence buffer = valid length (default: the job path's bucket)")
    p.add_argument("--ckpt-config", default=None, metavar="CONFIG",
                   help="model geometry ('qwen2-audio-7b', an HF config.json, ...; random weights); default: the "
                        "bench's 32-layer narrow model")
    p.add_argument("--model", default="qwen2-audio", choices=("qwen2-audio", "kimi-audio"),
                   help="without --ckpt-config: the narrow Qwen2-Audio or the Kimi-Audio-shaped model (28 layers)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    p.add_argument("--out", default=None, help="write the results as JSON here")

    p = sub.add_parser("bench-bf16", help="the bf16 gate: next-token KL and top-1 agreement of bfloat16 against float32 "
                                          "(real Whisper, SmolLM2 as a Qwen2 decoder, converted Qwen2-Audio checkpoints)")
    p.add_argument("--whisper", nargs="*", default=["tiny.en", "base"], choices=("tiny.en", "base"),
                   help="installed real Whisper models to gate (--whisper alone: none)")
    p.add_argument("--clips", type=int, default=5, help="LibriVox clips per Whisper model (1-5)")
    p.add_argument("--smollm2", action=argparse.BooleanOptionalAction, default=True,
                   help="SmolLM2-135M, a Qwen2-architecture decoder with real weights (GGUF asset)")
    p.add_argument("--ckpt", nargs="*", default=[], help="converted Qwen2-Audio checkpoints to gate")
    p.add_argument("--out", default=None, help="write the results as JSON here")

    p = sub.add_parser("bench-eval", help="items/s of `affjax eval` (Qwen2-Audio asr) for a tiny and a ~70 M random "
                                          "checkpoint: batch sizes, unpooled vs pooled, two-pass vs in-order padding")
    p.add_argument("--models", nargs="*", default=["tiny", "70m"], choices=("tiny", "70m"))
    p.add_argument("--batch", type=int, nargs="*", default=[1, 4, 8])
    p.add_argument("--pooling", nargs="*", default=["none", "dap-aggressive"])
    p.add_argument("--items", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--repeats", type=int, default=1, help="timed runs per cell (after one compiling run); median")
    p.add_argument("--out", default=None, help="write the results as JSON here")

    p = sub.add_parser("bench-whisper-pooling",
                       help="accuracy sweep of Affinity Pooling on real Whisper weights (tau x window x stage, "
                            "plain and proportional, fixed-rate controls): JSON, markdown table, PNG plot")
    p.add_argument("--model", default="whisper-base", choices=("whisper-base", "whisper-tiny.en"))
    p.add_argument("--taus", type=float, nargs="+", default=[0.99, 0.98, 0.97, 0.96, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7])
    p.add_argument("--windows", type=int, nargs="+", default=[1, 3])
    p.add_argument("--stages", nargs="+", default=["out", "3", "5"],
                   help="'out' (the encoder output) or an encoder layer l (after layer l)")
    p.add_argument("--no-controls", action="store_true", help="skip the fixed-rate controls")
    p.add_argument("--control-windows", type=int, nargs="+", default=[1],
                   help="windows whose cells get the controls at equal retention")
    p.add_argument("--control-taus", type=float, nargs="+", default=[0.99, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7])
    p.add_argument("--utterances", type=int, default=36, help="piper utterances (generated and cached)")
    p.add_argument("--librivox", type=int, default=5, help="LibriVox clips (0 to 5)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=160)
    p.add_argument("--out", default="docs/results", help="JSON, table and plot go here")
    p.add_argument("--work", default=None, help="transcripts of every cell (default runs/NAME)")
    p.add_argument("--name", default="whisper_pooling", help="file name stem of the outputs")
    p.add_argument("--no-compile-cache", action="store_true", help="disable JAX's persistent compilation cache")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("bench-lslm-pooling",
                       help="accuracy sweep of Affinity Pooling on a speech LM checkpoint (lslm-tiny): input, deep and "
                            "dual stages x tau, fixed-rate controls at equal retention; JSON, markdown table, PNG plot")
    p.add_argument("--ckpt", required=True, help="converted Qwen2-Audio-format checkpoint")
    p.add_argument("--manifest", default=None, help="JSONL: id, audio, reference (or target / text)[, prompt]")
    p.add_argument("--limit", type=int, default=None, help="only the first N manifest items")
    p.add_argument("--librivox", type=int, default=5, help="LibriVox clips (0 to 5)")
    p.add_argument("--stages", nargs="+", default=None,
                   help="input, a decoder layer l (after layer l), dual or dual:l (input + layer l, default L-3); "
                        "default: input, L/4, L/2, 3L/4, dual")
    p.add_argument("--taus", type=float, nargs="+", default=[0.99, 0.98, 0.97, 0.95, 0.93, 0.9, 0.85, 0.8, 0.7, 0.6])
    p.add_argument("--no-controls", action="store_true", help="skip the fixed-rate controls")
    p.add_argument("--control-taus", type=float, nargs="+", default=[0.98, 0.95, 0.9, 0.85, 0.8, 0.7],
                   help="taus whose cells get the controls at equal retention")
    p.add_argument("--proportional-too", action="store_true",
                   help="every cell also with --proportional (log group size on the attention logits)")
    p.add_argument("--window-input", type=int, default=1, help="window of the input stage")
    p.add_argument("--window-deep", type=int, default=3, help="window of a deep stage")
    p.add_argument("--dual-offset", type=float, default=0.1, help="dual: the deep stage runs at tau minus this")
    p.add_argument("--positions", default="first", choices=("first", "mean", "reindex"))
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"))
    p.add_argument("--out", default="docs/results", help="JSON, table and plot go here")
    p.add_argument("--work", default=None, help="transcripts of every cell (default runs/NAME)")
    p.add_argument("--name", default="lslm_pooling", help="file name stem of the outputs")
    p.add_argument("--no-compile-cache", action="store_true", help="disable JAX's persistent compilation cache")
    p.add_argument("--no-progress", action="store_true")

    p = sub.add_parser("compare-cuts", help="the largest pooling cut per stage at one WER ceiling across "
                                            "bench-lslm-pooling sweeps of several models (e.g. training-free vs "
                                            "fine-tuned)")
    p.add_argument("sweeps", nargs="+", metavar="[LABEL=]JSON[,JSON...]",
                   help="one model's sweep JSONs, comma-joined (merged); the first model sets the ceiling")
    p.add_argument("--margin", type=float, default=1.0, help="WER points above the first model's unpooled WER")
    p.add_argument("--own", action="store_true",
                   help="each model's ceiling is its own unpooled WER + margin (tolerance of pooling)")
    p.add_argument("--out", default=None, help="also write the markdown table here")

    p = sub.add_parser("eval", help="accuracy jobs: Whisper asr (WER; with no --pooling, unpooled and the default "
                                    "pooled setting) and Qwen2-Audio / Kimi-Audio asr / qa / st (WER or CER, accuracy, "
                                    "BLEU)")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--ckpt", help="converted checkpoint directory (checkpoints_convert/convert.py)")
    src.add_argument("--model", choices=("whisper-base", "whisper-tiny.en", "lslm-tiny"),
                     help="an installed real model, converted once into $AFFJAX_CACHE/models (~/.cache/affjax); "
                          "lslm-tiny: our small speech LM (docs/training.md)")
    p.add_argument("--task", default=None, choices=("asr", "qa", "st"),
                   help="default asr (an hf: recipe brings its own task)")
    data = p.add_mutually_exclusive_group(required=True)
    data.add_argument("--manifest", help="JSONL items (fields per task: docs/manifests.md)")
    data.add_argument("--data", help="librivox (5 read-speech clips, Whisper) or hf:DATASET[:CONFIG]:SPLIT "
                                     "(a Hugging Face data set with a recipe, Qwen2-Audio)")
    p.add_argument("--out", default=None, help="output (run) directory; re-running the same command resumes it")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--dtype", default=None, choices=(None, "float32", "bfloat16"),
                   help="compute dtype (default: the checkpoint's)")
    p.add_argument("--normalizer", default="english", choices=("english", "basic"),
                   help="Whisper WER text normaliser (Whisper's English one by default)")
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=4,model=2 (default: every device on data)")
    _add_run(p, schedule_default="two-pass")
    g = p.add_argument_group("Affinity Pooling (Whisper: LAYER = encoder layer, 0 .. L; L = the encoder output)")
    g.add_argument("--pooling", default=None,
                   help="preset (none, input, dap-conservative, dap-aggressive) or stages "
                        "'LAYER:tau=F,window=N[,weighted];...'. Whisper default: run unpooled and the encoder "
                        "output at tau 0.95, window 1, proportional")
    g.add_argument("--proportional", action="store_true",
                   help="add log(group size) to the attention logits of merged keys")
    g.add_argument("--positions", default="first", choices=("first", "mean", "reindex"),
                   help="position ids of merged tokens (ignored for Whisper: absolute positions before layer 1)")
    g.add_argument("--pool-mode", default="bucketed", choices=("bucketed", "fixed"),
                   help="Qwen2-Audio / Kimi-Audio: bucketed (exact thresholds) or fixed (one compiled prefill, "
                        "--capacity)")
    g.add_argument("--capacity", type=_capacity, default=None,
                   help="fixed mode: retention cap, one fraction or one per stage")
    g.add_argument("--drop-padding", action="store_true",
                   help="diagnostic: remove the encoder frames past each clip (breaks Whisper, even unpooled)")
    g = p.add_argument_group("Oracle interventions (Qwen2-Audio checkpoints; docs/pooling.md, 'Oracle interventions')")
    g.add_argument("--oracle", default=None, metavar="SPEC;SPEC...",
                   help="word boundaries from Whisper base's alignment heads, then one run per intervention into "
                        "OUT/SPEC: none, merge-words[:gaps=merge], drop-words:p=P, drop-random:p=P[,seed=S], "
                        "drop-uniform:p=P; e.g. 'none;merge-words;drop-words:p=0.5'")
    g.add_argument("--alignment", default=None, metavar="FILE",
                   help="word alignments to reuse or write (JSONL; default OUT/alignment.jsonl)")

    p = sub.add_parser("report", help="markdown table + plot (metric vs retention / FLOPs) across eval run dirs")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="eval output directories (each with summary.json)")
    p.add_argument("--out", default=None, help="also write the table to this markdown file")
    p.add_argument("--plot", default=None, help="write a PNG plot here")
    p.add_argument("--by", default=None, metavar="FIELD",
                   help="also WER per value of this manifest field (e.g. engine, voice); needs --manifest")
    p.add_argument("--manifest", default=None, help="the JSONL the runs were evaluated on (with --by)")

    p = sub.add_parser("train", help="fine-tune a Qwen2-Audio-format checkpoint (projector, LoRA) with optax, "
                                     "pooling optionally in the loop (docs/training.md)")
    p.add_argument("--ckpt", required=True, help="converted checkpoint directory")
    p.add_argument("--manifest", required=True, help="JSONL: id, audio, target (or text)[, prompt]")
    p.add_argument("--out", required=True, help="run folder (resumed when it exists)")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (the schedule's length)")
    p.add_argument("--trainable", type=_names, default=("projector", "lora"),
                   help="comma-separated: projector, lora, lm (every decoder parameter); default projector,lora")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--lora-alpha", type=float, default=None, help="default 2 x rank")
    p.add_argument("--lora-layers", type=_layers, default=None, help="decoder layers with adapters, e.g. 0-29 or 20,25")
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate (linear warm-up, cosine decay)")
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0, help="global gradient-norm clip")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--accumulate", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tau-range", type=_range, default=None,
                   help="with --pooling: each batch draws every stage's tau uniformly from LO,HI")
    p.add_argument("--prompt", default=None, help="prompt of items without one (default: the ASR prompt)")
    p.add_argument("--save-every", type=int, default=200)
    p.add_argument("--keep", type=int, default=2, help="checkpoints kept")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=0, help="validation WER every N steps (0: never)")
    p.add_argument("--eval-manifest", default=None)
    p.add_argument("--eval-items", type=int, default=32)
    p.add_argument("--mesh", default=None, help="device mesh, e.g. data=4,model=2")
    p.add_argument("--cache-dir", default=None, help="encoder-output cache (default ~/.cache/affjax/encoder)")
    p.add_argument("--restart", action="store_true", help="delete the run at --out and start over")
    p.add_argument("--carry", default=None, help="a run folder without a checkpoint starts from this carry "
                   "(`affjax export --carry`): the same run continued on another machine")
    p.add_argument("--no-compile-cache", action="store_true")
    p.add_argument("--no-progress", action="store_true")
    g = p.add_argument_group("Affinity Pooling in the loop")
    g.add_argument("--pooling", default=None, help="as in eval, e.g. '0:tau=0.8,window=1' or a preset")
    g.add_argument("--positions", default="first", choices=("first", "mean", "reindex"))
    g.add_argument("--proportional", action="store_true")

    p = sub.add_parser("bench-train", help="one training step (projector + LoRA, fp32): affjax vs PyTorch, side by side")
    p.add_argument("--hf", required=True, help="a Qwen2-Audio-format HF folder (e.g. python -m affjax.train.lslm base)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--audio-tokens", type=int, default=100, help="audio tokens per row (4 s of audio at 25 Hz)")
    p.add_argument("--lora-rank", type=int, default=8)
    p.add_argument("--repeats", type=int, default=5, help="timed steps per block")
    p.add_argument("--blocks", type=int, default=2, help="alternating blocks of the two sides")
    p.add_argument("--out", default=None, help="write the JSON result here")

    p = sub.add_parser("export", help="a training run -> a checkpoint every command accepts (LoRA merged)")
    p.add_argument("--run", required=True, help="the run folder of `affjax train`")
    p.add_argument("--out", default=None, help="checkpoint directory to write")
    p.add_argument("--carry", default=None, help="also (or only) write the run's carry: one small file that "
                   "`affjax train --carry` continues the run from on another machine (docs/training.md)")

    args = ap.parse_args(argv)

    if args.cmd in ("train", "export"):
        return _run_train(args)
    if args.cmd in ("eval", "score", "generate"):
        return _run_job(args)
    # deferred: each command imports only its own module (jax, matplotlib, torch), after parsing
    if args.cmd == "report":
        from affjax.eval.report import main_report
        return main_report(args)
    if args.cmd == "plan" and args.aot:
        from affjax.runtime import aot
        try:  # before jax loads: the host on CPU, the TPU devices compile-only
            aot.prepare_env(args.vmem_mib)
        except aot.AotError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        return aot.main_plan_aot(args)
    if args.cmd == "plan":
        from affjax.runtime.plan import main_plan
        return main_plan(args)
    if args.cmd == "bench":
        from affjax.bench.prefill import main_bench
        return main_bench(args)
    if args.cmd == "bench-train":
        from affjax.bench.train import main_bench_train
        return main_bench_train(args)
    if args.cmd == "bench-eval":
        from affjax.bench.eval import main_bench_eval
        return main_bench_eval(args)
    if args.cmd == "bench-bf16":
        from affjax.bench.bf16 import main_bench_bf16
        if not 1 <= args.clips <= 5:
            print("error: --clips must be 1 to 5 (the LibriVox clips)", file=sys.stderr)
            return 1
        return main_bench_bf16(args)
    if args.cmd == "bench-pooling":
        from affjax.bench.pooling import main_bench_pooling
        return main_bench_pooling(args)
    if args.cmd == "bench-whisper-pooling":
        from affjax.bench.whisper_pooling import main_bench_whisper_pooling
        return main_bench_whisper_pooling(args)
    if args.cmd == "compare-cuts":
        from affjax.bench.lslm_pooling import main_compare_cuts
        return main_compare_cuts(args)
    if args.cmd == "bench-lslm-pooling":
        from affjax.bench.lslm_pooling import main_bench_lslm_pooling
        return main_bench_lslm_pooling(args)
    return 2


if __name__ == "__main__":
    sys.exit(main())
