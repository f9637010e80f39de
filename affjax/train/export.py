"""`affjax export`: a training run -> a checkpoint every command accepts; and greedy transcription
of manifest items with a model in memory (validation during training).

Export restores the run's latest trainable parameters into the base checkpoint's model, folds the
LoRA adapters into the kernels (affjax.train.lora.merge_lora) and writes an ordinary affjax
checkpoint: the base checkpoint's files (config, processor, tokenizer) and the new parameters,
built in a temporary folder and renamed into place. It also writes `trained.safetensors` beside
the run (only the trained parameters, adapters unmerged, with the LoRA settings in its metadata):
the few megabytes that, applied to the base model (`apply_trained`), give the same checkpoint.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from affjax.eval.results import fingerprint_file
from affjax.models import checkpoint
from affjax.models.qwen2_audio import inputs
from affjax.runtime.engine import Engine
from affjax.train.lora import add_lora, merge_lora

TRAINED_FILE = "trained.safetensors"


def transcribe(model, processor, items: list[dict], *, prompt: str | None, pooling=None, max_new_tokens: int = 64,
               batch_size: int = 8, eos_ids=None) -> list[str]:
    """Greedy text of each item (`audio` path, optional `prompt`) through the inference engine."""
    from affjax.data.audio import load_audio
    from affjax.train.lslm import ASR_PROMPT

    tok = processor.tokenizer
    eos = eos_ids or [tok.eos_token_id, tok.pad_token_id]
    engine = Engine(model, pooling=pooling, eos_ids=[e for e in eos if e is not None], pad_id=tok.pad_token_id or 0)
    out_frames = model.cfg.audio.output_lengths
    hyps = []
    for b0 in range(0, len(items), batch_size):
        part = items[b0:b0 + batch_size]
        enc = [inputs.encode(processor, it.get("prompt") or prompt or ASR_PROMPT, [load_audio(it["audio"])])
               for it in part]
        batch = inputs.collate(enc, batch_size=batch_size, audio_token_id=model.cfg.audio_token_id,
                               out_frames_of=out_frames, pad_id=tok.pad_token_id or 0)
        tokens, _ = engine.generate(batch, max_new_tokens)
        hyps += [tok.decode(t, skip_special_tokens=True).strip() for t in tokens]
    return hyps


def flat_params(pure: dict, prefix: str = "") -> dict[str, np.ndarray]:
    out = {}
    for k, v in pure.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flat_params(v, key + "."))
        else:
            out[key] = np.asarray(jax.device_get(v))
    return out


def unflat_params(flat: dict[str, np.ndarray]) -> dict:
    out: dict = {}
    for key, v in flat.items():
        node = out
        *parents, last = key.split(".")
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(last) if last.isdigit() else last] = v
    return out


def _is_adapter(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("lora_a", "lora_b")


def write_trained(trainer, path: str | Path, *, adapters: str | Path | None = None) -> Path:
    """The trained parameters (adapters unmerged) as safetensors, with what `apply_trained` needs.
    `adapters`: a second file, beside `path`, for the LoRA factors in float16 (half the bytes; a
    repository that keeps each file small), named with its SHA-256 in `path`'s metadata."""
    from safetensors.numpy import save_file

    c = trainer.cfg
    meta = {"trainable": ",".join(c.trainable), "lora_rank": str(c.lora_rank),
            "lora_alpha": "" if c.lora_alpha is None else str(c.lora_alpha),
            "lora_layers": "" if c.lora_layers is None else ",".join(map(str, c.lora_layers)),
            "step": str(trainer.step)}
    flat = flat_params(nnx.to_pure_dict(trainer.train))
    if adapters is not None:
        adapters = Path(adapters)
        if adapters.parent.resolve() != Path(path).parent.resolve():
            raise ValueError(f"the adapters file must sit beside {path}, not in {adapters.parent}")
        save_file({k: v.astype(np.float16) for k, v in flat.items() if _is_adapter(k)}, str(adapters))
        flat = {k: v for k, v in flat.items() if not _is_adapter(k)}
        meta.update(adapters=adapters.name, adapters_sha256=fingerprint_file(adapters))
    save_file(flat, str(path), metadata=meta)
    return Path(path)


def read_trained(trained: str | Path) -> tuple[dict[str, np.ndarray], dict]:
    """(flat parameters, metadata) of a file of `write_trained`, with its adapters file if it has one."""
    from safetensors import safe_open
    from safetensors.numpy import load_file

    trained = Path(trained)
    with safe_open(str(trained), "np") as f:
        meta = f.metadata() or {}
        flat = {k: f.get_tensor(k) for k in f.keys()}
    if meta.get("adapters"):
        side = trained.parent / meta["adapters"]
        if not side.is_file():
            raise FileNotFoundError(f"{trained}: its LoRA adapters file {side} is missing")
        if fingerprint_file(side) != meta.get("adapters_sha256"):
            raise ValueError(f"{trained}: {side.name} is not the adapters file it was written with (SHA-256 differs)")
        flat.update(load_file(str(side)))
    return flat, meta


def apply_trained(base_ckpt: str | Path, trained: str | Path, dst: str | Path, *, note: dict | None = None) -> Path:
    """Base checkpoint + trained.safetensors -> a merged checkpoint at `dst`."""
    flat, meta = read_trained(trained)
    model, _, base_meta = checkpoint.load(base_ckpt, dtype="float32")
    if "lora" in meta.get("trainable", "").split(","):
        layers = tuple(int(x) for x in meta["lora_layers"].split(",")) if meta.get("lora_layers") else None
        add_lora(model, rank=int(meta["lora_rank"]), alpha=float(meta["lora_alpha"]) if meta.get("lora_alpha") else None,
                 layers=layers)
    state = nnx.state(model)
    pure = nnx.to_pure_dict(state)
    _assign(pure, unflat_params(flat), str(trained))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
    merge_lora(model)
    return save_checkpoint(model, base_ckpt, dst, note={"trained": meta, **(note or {})})


def _assign(pure: dict, new: dict, what: str, path: str = "") -> None:
    for k, v in new.items():
        if k not in pure:
            raise ValueError(f"{what}: parameter {path}{k} is not in the model")
        if isinstance(v, dict):
            _assign(pure[k], v, what, f"{path}{k}.")
        else:
            if tuple(np.shape(pure[k])) != tuple(v.shape):
                raise ValueError(f"{what}: {path}{k} has shape {v.shape}, the model {np.shape(pure[k])}")
            pure[k] = np.asarray(v).astype(pure[k].dtype)  # float16 adapters back to the model's dtype


def save_checkpoint(model, like: str | Path, dst: str | Path, *, note: dict | None = None) -> Path:
    """Write `model`'s parameters as an affjax checkpoint at `dst`, with every other file of the
    checkpoint `like` (same architecture); atomic, as the converter writes (its temporary-folder
    naming, stale-folder cleanup and rename)."""
    like, dst = Path(like), Path(dst)
    dst.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.remove_stale_temps(dst)
    tmp = Path(tempfile.mkdtemp(prefix=checkpoint.temp_prefix(dst), dir=dst.parent))
    try:
        for f in like.iterdir():
            if f.name == checkpoint.PARAMS_DIR:
                continue
            (shutil.copytree if f.is_dir() else shutil.copy2)(f, tmp / f.name)
        state = jax.tree.map(lambda x: np.asarray(jax.device_get(x)), nnx.state(model))
        checkpoint.save_params(state, tmp / checkpoint.PARAMS_DIR)
        meta = json.loads((tmp / checkpoint.CONFIG_NAME).read_text())
        meta.update(note or {})
        (tmp / checkpoint.CONFIG_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        checkpoint.publish(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def run_trainer(run_dir: str | Path, *, log=print):
    """A Trainer (no data) at the latest checkpoint of a training run, from its run.json."""
    from affjax.train.trainer import TrainConfig, Trainer

    run_dir = Path(run_dir)
    settings = json.loads((run_dir / "run.json").read_text())["settings"]
    fields = {f for f in TrainConfig.__dataclass_fields__}
    kw = {k: v for k, v in settings.items() if k in fields}
    for k in ("trainable", "lora_layers", "tau_range"):
        if kw.get(k) is not None:
            kw[k] = tuple(kw[k])
    trainer = Trainer(TrainConfig(out=str(run_dir), progress=False, **kw), log=log, data=False)
    if trainer.step == 0:
        raise ValueError(f"{run_dir}: no saved training step to export")
    return trainer


def export_run(run_dir: str | Path, out: str | Path, *, log=print) -> Path:
    """The latest checkpoint of a training run -> `out` (merged) and RUN/trained.safetensors."""
    run_dir = Path(run_dir)
    trainer = run_trainer(run_dir, log=log)
    trained = write_trained(trainer, run_dir / TRAINED_FILE)
    model = merge_lora(trainer.model())
    dst = save_checkpoint(model, trainer.cfg.ckpt, out, note={"trained": {"run": run_dir.resolve().name,
                                                                            "step": trainer.step}})
    log(f"exported step {trainer.step} of {run_dir} -> {dst} (trained weights: {trained})")
    return dst
