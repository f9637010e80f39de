"""Run a converted tiny Qwen2-Audio checkpoint through the Engine on one device and on several
meshes, in a fresh process whose XLA_FLAGS ask for fake CPU devices (tests/test_sharding.py).

    python tests/sharding_check.py CKPT OUT.json --meshes data=8,model=1 data=4,model=2 ...

Writes {"reference": {setting: {"logprobs", "tokens"}}, "meshes": {mesh: {...same..., "params": facts}}}.
With --multiprocess PORT PROCESS_ID N: one process of N (jax.distributed on localhost), each
scoring / generating its host_share of the items; process 0 writes the gathered results.
--items PATH reads the encoded items `write_items` saved (no processor, no transformers import).
--job MANIFEST OUT MESH also runs `affjax score --mesh MESH` on a manifest of the same items
(`write_manifest`) and keeps its printed summary under "job".
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import sys
import time

STAGES = "0:tau=0.83,window=1;2:tau=0.86,window=3"  # keeps part of the tiny model's audio at each stage
SETTINGS = {
    "none": dict(pooling=None),
    "bucketed-proportional": dict(pooling=STAGES, proportional=True),
    "fixed": dict(pooling=STAGES, pool_mode="fixed", capacity=(0.7, 0.6)),
}
SECONDS = (1.0, 2.5, 3.0, 1.5, 2.0)
CONTINUATIONS = (" hello there", " twelve", " it is raining", " yes", " the end of it")
MAX_NEW = 6


def items(processor, score: bool):
    from affjax.models.qwen2_audio.inputs import encode
    from affjax.testing import long_prompt, synth_speech_like

    return [encode(processor, long_prompt(8 + 4 * i, seed=i), [synth_speech_like(s, seed=20 + i)],
                   CONTINUATIONS[i] if score else None) for i, s in enumerate(SECONDS)]


def write_items(ckpt, path) -> None:
    """Encode the items once with the checkpoint's processor: {"pad", "score", "generate"} pickled."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(ckpt)
    with open(path, "wb") as f:
        pickle.dump({"pad": processor.tokenizer.pad_token_id, "score": items(processor, True),
                     "generate": items(processor, False)}, f)


def write_manifest(directory) -> str:
    """The score items as a manifest (float WAV files, so the audio is bit-identical)."""
    from pathlib import Path

    import soundfile as sf

    from affjax.testing import long_prompt, synth_speech_like

    d = Path(directory)
    rows = []
    for i, s in enumerate(SECONDS):
        wav = d / f"item{i}.wav"
        sf.write(wav, synth_speech_like(s, seed=20 + i), 16000, subtype="FLOAT")
        rows.append({"id": f"item{i}", "audio": str(wav), "prompt": long_prompt(8 + 4 * i, seed=i),
                     "continuation": CONTINUATIONS[i]})
    path = d / "manifest.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def write_eval_manifest(directory) -> str:
    """qa items for `affjax eval`: multiple choice (scored) and open answers (generated) mixed."""
    from pathlib import Path

    import soundfile as sf

    from affjax.testing import long_prompt, synth_speech_like

    d = Path(directory)
    rows = []
    for i, s in enumerate(SECONDS):
        wav = d / f"eval{i}.wav"
        sf.write(wav, synth_speech_like(s, seed=40 + i), 16000, subtype="FLOAT")
        row = {"id": f"e{i}", "audio": str(wav), "prompt": long_prompt(6 + 5 * i, seed=10 + i)}
        row.update({"choices": list(CONTINUATIONS[:3]), "answer": i % 3} if i % 2 == 0 else {"answer": "yes"})
        rows.append(row)
    path = d / "eval.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def run_settings(model, cfg, pad, mesh, encoded, batch_size, settings=tuple(SETTINGS)):
    """{setting: {"logprobs": [...], "tokens": [[...]...]}} for the given encoded items."""
    from affjax.runtime.engine import Engine
    from affjax.models.qwen2_audio.inputs import collate
    from affjax.pooling.spec import parse_pooling

    out = {}
    for name in settings:
        s = SETTINGS[name]
        pooling = parse_pooling(s["pooling"], cfg.text.layers, proportional=s.get("proportional", False))
        engine = Engine(model, pooling=pooling, pool_mode=s.get("pool_mode", "bucketed"),
                        capacity=s.get("capacity"), eos_ids=(), pad_id=pad, mesh=mesh)
        res = {}
        for job in ("score", "generate"):
            enc = encoded[job]
            batch = collate(enc, batch_size=batch_size, audio_token_id=cfg.audio_token_id,
                            out_frames_of=cfg.audio.output_lengths, pad_id=pad,
                            cont_len=8 if job == "score" else None)
            if job == "score":
                lp, stats = engine.score(batch)
                res["logprobs"] = [float(x) for x in lp[:len(enc)]]
            else:
                toks, stats = engine.generate(batch, MAX_NEW)
                res["tokens"] = toks
                if mesh is not None and name == settings[0]:  # where the prefill's outputs live (cached programs)
                    out_ = engine.prefill(batch, extra=MAX_NEW)
                    res["placement"] = {"kv_cache": list(out_.caches[0][0].sharding.spec),
                                        "rows": list(out_.group_len[0].sharding.spec),
                                        "logits": list(out_.logits.sharding.spec)}
            if stats:
                res[f"audio_{job}"] = [[int(x) for x in st["audio_out"][:len(enc)]] for st in stats]
        out[name] = res
    return out


def param_facts(model, mesh):
    """Sharding facts of a few parameters right after loading."""
    import jax
    import numpy as np

    lm, at = model.language_model, model.audio_tower
    probe = {"q_proj": lm.layers[0].self_attn.q_proj.kernel, "k_proj": lm.layers[0].self_attn.k_proj.kernel,
             "o_proj": lm.layers[0].self_attn.o_proj.kernel, "down_proj": lm.layers[0].mlp.down_proj.kernel,
             "embed_tokens": lm.embed_tokens, "lm_head": lm.lm_head, "audio_fc1": at.layers[0].fc1.kernel,
             "audio_q_proj": at.layers[0].q_proj.kernel, "norm": lm.norm.scale}
    facts = {}
    for name, v in probe.items():
        x = v[...]
        facts[name] = {"spec": [a for a in x.sharding.spec], "shape": list(x.shape),
                       "shard_shape": list(x.addressable_shards[0].data.shape),
                       "devices": len(x.sharding.device_set)}
    facts["mesh_devices"] = int(np.prod(list(mesh.shape.values())))
    # every leaf exactly where the rules put it, straight out of the orbax restore
    from flax import nnx

    from affjax.runtime import sharding

    rule = sharding.param_sharding(mesh, model.cfg)
    pure = nnx.to_pure_dict(nnx.state(model))
    flat = jax.tree_util.tree_flatten_with_path(pure)[0]
    facts["leaves"] = len(flat)
    facts["leaves_as_rules"] = sum(
        x.sharding.is_equivalent_to(rule(tuple(getattr(k, "key", k) for k in p), x), x.ndim) for p, x in flat)
    facts["leaves_sharded"] = sum(not x.sharding.is_fully_replicated for _, x in flat)
    first = mesh.devices.flat[0]
    facts["bytes_on_first_device"] = sum(int(sh.data.nbytes) for _, x in flat for sh in x.addressable_shards
                                         if sh.device == first)
    return facts


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("ckpt")
    ap.add_argument("out")
    ap.add_argument("--meshes", nargs="*", default=[], help="MESH, or MESH:SETTING,... to run only those there")
    ap.add_argument("--reference", action="store_true", help="also run on one device (no mesh)")
    ap.add_argument("--replace", action="store_true", help="also score with a one-device model given to a "
                                                           "mesh Engine")
    ap.add_argument("--multiprocess", nargs=3, type=int, metavar=("PORT", "PROCESS_ID", "N"))
    ap.add_argument("--settings", nargs="*", default=list(SETTINGS), choices=list(SETTINGS),
                    help="settings run on the meshes (the reference runs them all)")
    ap.add_argument("--items", default=None, help="items written by write_items (default: encode here)")
    ap.add_argument("--job", nargs=3, metavar=("MANIFEST", "OUT", "MESH"))
    ap.add_argument("--eval", nargs=3, metavar=("MANIFEST", "OUT_DIR", "MESH"),
                    help="also run `affjax eval --task qa` (bucketed proportional pooling); MESH 'none' = one device")
    args = ap.parse_args(argv)

    import jax

    from affjax.runtime import sharding

    if args.multiprocess:
        port, pid, n = args.multiprocess
        sharding.initialize_distributed(coordinator_address=f"localhost:{port}", num_processes=n, process_id=pid)
    from affjax.models.checkpoint import load

    t0 = time.perf_counter()
    if args.items is None:
        args.items = args.out + ".items.pkl"
        write_items(args.ckpt, args.items)
    with open(args.items, "rb") as f:
        encoded = pickle.load(f)
    pad = encoded.pop("pad")
    result = {"devices": jax.device_count(), "meshes": {}, "seconds": {}}
    if args.reference:
        model, cfg, _ = load(args.ckpt)
        result["reference"] = run_settings(model, cfg, pad, None, encoded, 8)  # every setting
        result["seconds"]["reference"] = round(time.perf_counter() - t0, 1)
    for entry in args.meshes:
        text, _, only = entry.partition(":")  # MESH or MESH:SETTING,SETTING (that mesh runs only those)
        settings = only.split(",") if only else args.settings
        t1 = time.perf_counter()
        mesh = sharding.make_mesh(text)
        model, cfg, _ = sharding.load(args.ckpt, mesh)  # restored directly onto the shards
        facts = param_facts(model, mesh)
        if args.multiprocess:
            mine = {k: sharding.host_share(v) for k, v in encoded.items()}
            ids = sharding.host_share(list(range(len(SECONDS))))
            res = run_settings(model, cfg, pad, mesh, mine, 8 // jax.process_count(), settings)
            rec = [{"index": i, **{f"{s}/{k}": r[k][j] for s, r in res.items() for k in ("logprobs", "tokens")}}
                   for j, i in enumerate(ids)]
            gathered = sharding.gather_to_host0(rec)
            if gathered is None:
                continue
            gathered.sort(key=lambda r: r["index"])
            res = {s: {k: [r[f"{s}/{k}"] for r in gathered] for k in ("logprobs", "tokens")} for s in settings}
        else:
            res = run_settings(model, cfg, pad, mesh, encoded, 8, settings)
        res["params"] = facts
        if args.replace:  # a model loaded on one device, placed by the Engine itself
            from affjax.runtime.engine import Engine
            from affjax.models.qwen2_audio.inputs import collate

            single, _, _ = load(args.ckpt)
            engine = Engine(single, pad_id=pad, mesh=mesh)
            batch = collate(encoded["score"], batch_size=8, audio_token_id=cfg.audio_token_id,
                            out_frames_of=cfg.audio.output_lengths, pad_id=pad, cont_len=8)
            res["replaced_logprobs"] = [float(x) for x in engine.score(batch)[0][:len(SECONDS)]]
            res["replaced_q_spec"] = list(engine.state["language_model"]["layers"][0]["self_attn"]["q_proj"]
                                          ["kernel"][...].sharding.spec)
        result["meshes"][text] = res
        result["seconds"][text] = round(time.perf_counter() - t1, 1)
    if args.eval:  # affjax eval: two-pass on one process, in-order on several (affjax.eval.lslm)
        from affjax.eval.runner import JobConfig, run_eval

        manifest, out_dir, mesh_text = args.eval
        cfg = JobConfig(ckpt=args.ckpt, manifest=manifest, out=out_dir, task="qa", batch_size=3,
                         max_new_tokens=MAX_NEW, pooling=STAGES, proportional=True, progress=False,
                         mesh=None if mesh_text == "none" else mesh_text)
        summary = run_eval(cfg, log=lambda *_: None)
        result["eval"] = {k: summary.get(k) for k in ("schedule", "mesh", "processes", "ok", "errors", "metrics")}
    if args.job:  # the CLI: affjax score --mesh (batch size 3, padded to whole rows of the data axis)
        import contextlib
        import io

        from affjax.cli import main as cli

        manifest, out, mesh_text = args.job
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            rc = cli(["score", "--ckpt", args.ckpt, "--manifest", manifest, "--out", out, "--batch-size", "3",
                      "--mesh", mesh_text, "--no-compile-cache", "--no-progress", "--no-xla-cost"])
        result["job"] = {"rc": rc, "summary": json.loads(text.getvalue()) if rc == 0 else text.getvalue()}
    if jax.process_index() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
