"""A training run's state in one small portable file, to continue the run on another machine.

A run folder (orbax checkpoints of the trainable parameters and the whole optimizer state) stays on
the machine that trains; a long run that must move (a new machine each session) needs its state
in a form small enough to carry along, e.g. committed beside the code. `write_carry` packs:

- the trainable parameters, float32 (exact);
- Adam's second moments, bfloat16: the optimizer's slow memory (b2 = 0.999: about 1000 steps),
  which a restart could not rebuild quickly;
- the step and the run's settings.

Adam's first moments (b1 = 0.9: about 10 steps) are left out and start at zero, so the first
updates after the move are damped, never enlarged. That halves the file (LoRA rank 8 on
SmolLM2-135M plus the projector: 2.7 M parameters, 16 MB). The continued run is therefore not
the unbroken one bit for bit: its next loss is (the parameters are exact), the updates after
differ slightly. `affjax train --carry FILE` starts a run folder that has no checkpoint from it.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from affjax.train.export import flat_params, unflat_params

CARRY_FORMAT = "affjax-train-carry/1"
# settings that may differ between the machines: the same recipe over regenerated data
MACHINE_SETTINGS = ("ckpt", "manifest", "eval_manifest", "ckpt_fingerprint", "manifest_sha", "carry")


def _adam(opt_state) -> optax.ScaleByAdamState:
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, optax.ScaleByAdamState))
             if isinstance(s, optax.ScaleByAdamState)]
    if len(found) != 1:
        raise ValueError(f"a carry needs one Adam state in the optimizer, found {len(found)}")
    return found[0]


def write_carry(trainer, path: str | Path) -> Path:
    """The trainer's current state (parameters, Adam's second moments, step, settings) -> `path`."""
    from safetensors.flax import save_file

    if trainer.cfg.accumulate > 1:
        raise ValueError("a carry is for runs without --accumulate (its partial sums are not carried)")
    params = flat_params(nnx.to_pure_dict(trainer.train))
    nu = flat_params(nnx.to_pure_dict(_adam(trainer.opt_state).nu))
    tensors = {f"params.{k}": jnp.asarray(v, jnp.float32) for k, v in params.items()}
    tensors.update({f"nu.{k}": jnp.asarray(v, jnp.bfloat16) for k, v in nu.items()})
    meta = {"format": CARRY_FORMAT, "step": str(trainer.step), "settings": json.dumps(trainer._settings())}
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(tensors, str(tmp), metadata=meta)
    tmp.replace(path)
    return path


def read_carry(path: str | Path) -> tuple[int, dict, dict[str, np.ndarray], dict[str, np.ndarray]]:
    """(step, settings, flat params, flat second moments) of a carry file."""
    from safetensors import safe_open

    with safe_open(str(path), "flax") as f:
        meta = f.metadata() or {}
        if meta.get("format") != CARRY_FORMAT:
            raise ValueError(f"{path}: not a training carry ({CARRY_FORMAT}); write one with `affjax carry`")
        params, nu = {}, {}
        for k in f.keys():
            part, name = k.split(".", 1)
            (params if part == "params" else nu)[name] = np.asarray(f.get_tensor(k), np.float32)
    return int(meta["step"]), json.loads(meta["settings"]), params, nu


def _load_into(state, flat: dict[str, np.ndarray], what: str):
    """`flat` (names as export.flat_params writes them) into an nnx.State of the same parameters, on the
    state's own shardings."""
    pure = nnx.to_pure_dict(state)
    have, got = set(flat_params(pure)), set(flat)
    if have != got:
        raise ValueError(f"{what}: the carry's parameters differ from the run's "
                         f"(missing {sorted(have - got)[:3]}, unknown {sorted(got - have)[:3]})")
    new = unflat_params(flat)

    def put(old, key_path):
        v = new
        for k in key_path:
            v = v[k.key]
        if tuple(np.shape(old)) != tuple(v.shape):
            raise ValueError(f"{what}: {'.'.join(str(k.key) for k in key_path)} has shape {v.shape}, "
                             f"the run {np.shape(old)}")
        return jax.device_put(v.astype(old.dtype), old.sharding)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_map_with_path(lambda p, x: put(x, p), pure))
    return state


def seed_from_carry(trainer, path: str | Path) -> int:
    """Set a fresh trainer's parameters, optimizer state and step from a carry; returns the step.
    Its settings must be the run's, except where the data and base checkpoint live (and their
    fingerprints: the corpus and base are rebuilt on each machine)."""
    step, settings, params, nu = read_carry(path)
    mine = trainer._settings()
    diff = sorted(k for k in set(mine) | set(settings)
                  if k not in MACHINE_SETTINGS and mine.get(k) != settings.get(k))
    if diff:
        raise ValueError(f"{path}: the carried run has other settings ({', '.join(diff)})")
    _load_into(trainer.train, params, f"{path}")
    adam = _adam(trainer.opt_state)
    _load_into(adam.nu, nu, f"{path}")

    def at_step(s):  # every step counter of the optimizer (Adam's, the schedule's) -> step
        if isinstance(s, tuple) and hasattr(s, "_fields") and "count" in s._fields:
            return s._replace(count=jax.device_put(jnp.full_like(s.count, step), s.count.sharding))
        return s

    trainer.opt_state = jax.tree.map(at_step, trainer.opt_state,
                                     is_leaf=lambda s: isinstance(s, tuple) and hasattr(s, "_fields"))
    trainer.step = step
    return step
