"""Streaming weight loading: a declarative key table applied tensor by tensor.

The model is built abstractly (`nnx.eval_shape`: no memory), then each checkpoint tensor is read
on its own, mapped through its table row and transform, checked against the abstract leaf's
shape, cast and placed. Every missing, unused or mis-shaped key is collected and reported in one
error at the end, so a bad checkpoint is described whole, not one key per run.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

TRANSFORMS: dict[str, Callable[[np.ndarray], np.ndarray]] = {
    "copy": lambda w: w,
    "linear": lambda w: w.T,
    "conv": lambda w: w.transpose(2, 1, 0),
}


class WeightError(ValueError):
    """A checkpoint does not fit the model: every problem is listed in the message."""


class KeyTable:
    def __init__(self, rows: list[tuple[str, str, str]], aliases: list[tuple[str, str]] = ()):
        self.aliases = list(aliases)
        self.rows = []
        for hf, fx, transform in rows:
            if transform not in TRANSFORMS:
                raise ValueError(f"unknown transform {transform!r} for {hf}")
            pattern = re.compile("^" + re.escape(hf).replace(r"\{i\}", r"(?P<i>\d+)") + "$")
            self.rows.append((pattern, fx, transform))

    def canonical(self, key: str) -> str:
        for old, new in self.aliases:
            if key.startswith(old):
                return new + key[len(old):]
        return key

    def lookup(self, key: str) -> tuple[tuple, str] | None:
        """HF key -> (NNX path tuple, transform name), or None for a key the table does not know."""
        key = self.canonical(key)
        for pattern, fx, transform in self.rows:
            m = pattern.match(key)
            if m:
                path = fx.replace("{i}", m.group("i")) if "i" in m.groupdict() else fx
                return tuple(int(p) if p.isdigit() else p for p in path.split(".")), transform
        return None


def _describe(path) -> str:
    return ".".join(str(p) for p in path)


def load_streaming(abstract_model: nnx.Module, table: KeyTable,
                   tensors: Iterable[tuple[str, Callable[[], np.ndarray]]], *,
                   dtype=None, sharding_for: Callable | None = None,
                   ignore: Callable[[str], bool] = lambda k: False,
                   progress: Callable[[int], None] | None = None,
                   as_numpy: bool = False) -> nnx.State:
    """Fill the abstract model's parameters from (key, loader) pairs, one tensor in memory at a time.

    `tensors` yields (hf_key, load_fn); load_fn() returns the numpy array. Returns the concrete
    parameter State. Raises WeightError listing every missing, unused and mis-shaped key.
    as_numpy: keep the filled leaves as host numpy arrays (C-contiguous, cast to the target dtype)
    instead of jax arrays: no device copy, so the loaded tensor itself is kept when no cast or
    transpose is needed (the converter writes these straight to disk).
    """
    _, abstract = nnx.split(abstract_model)
    flat = dict(nnx.to_flat_state(abstract))
    filled: dict[tuple, jax.Array] = {}
    unused, bad_shape, bad_paths = [], [], set()
    for n, (key, load) in enumerate(tensors):
        hit = table.lookup(key)
        if hit is None or hit[0] not in flat:
            if not ignore(key):
                unused.append(key if hit is None else f"{key} (-> {_describe(hit[0])}, not in this model)")
            continue
        path, transform = hit
        if path in filled or path in bad_paths:
            unused.append(f"{key} (-> {_describe(path)}, which an earlier tensor already filled)")
            continue
        leaf = flat[path]
        raw = np.asarray(load())
        arr = TRANSFORMS[transform](raw)
        if tuple(arr.shape) != tuple(leaf.shape):
            after = "" if transform == "copy" else f", {tuple(arr.shape)} after '{transform}'"
            bad_shape.append(f"{key}: checkpoint {tuple(raw.shape)}{after}, "
                             f"model {_describe(path)} expects {tuple(leaf.shape)}")
            bad_paths.add(path)
            continue
        target_dtype = dtype or leaf.dtype
        if as_numpy:
            value = np.ascontiguousarray(arr, dtype=jnp.dtype(target_dtype))
        elif sharding_for is None:
            value = jnp.asarray(arr, dtype=target_dtype)
        else:
            value = jax.device_put(arr.astype(jnp.dtype(target_dtype)), sharding_for(path))
        del raw, arr
        filled[path] = value
        if progress:
            progress(n)
    missing = [_describe(p) for p in flat if p not in filled and p not in bad_paths]
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (model parameters with no tensor): " + ", ".join(missing))
    if unused:
        problems.append(f"{len(unused)} unused (tensors the model has no place for): " + ", ".join(unused))
    if bad_shape:
        problems.append(f"{len(bad_shape)} with wrong shape: " + "; ".join(bad_shape))
    if problems:
        raise WeightError("checkpoint does not match the model:\n  " + "\n  ".join(problems))
    for path, value in filled.items():
        flat[path] = flat[path].replace(value) if hasattr(flat[path], "replace") else value
    return nnx.from_flat_state(flat)


def iter_state_dict(state_dict: dict) -> Iterator[tuple[str, Callable[[], np.ndarray]]]:
    """(key, loader) pairs from an in-memory torch or numpy state dict (tests, small models)."""
    for k, v in state_dict.items():
        yield k, (lambda v=v: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v))
