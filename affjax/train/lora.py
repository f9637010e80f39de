"""LoRA adapters on the decoder's linear layers, and their merge back into plain weights.

`add_lora` swaps chosen `nnx.Linear` layers of the Qwen2 decoder for `LoRALinear` (the frozen
layer plus a rank-r update x A B * alpha / r, B starting at zero so the model is unchanged at
step 0). The adapter weights are `nnx.LoRAParam`s, so `nnx.split(model, nnx.LoRAParam, ...)`
separates them. `merge_lora` folds each update into the kernel and puts the plain layer back:
the merged model has exactly the structure a converted checkpoint restores into.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")
TARGETS = ATTENTION + MLP


class LoRALinear(nnx.Module):
    def __init__(self, base: nnx.Linear, *, rank: int, alpha: float, key: jax.Array):
        self.base = base
        d_in, d_out = base.kernel.shape
        dtype = base.kernel.dtype
        self.lora_a = nnx.LoRAParam(jax.random.normal(key, (d_in, rank), dtype) * d_in ** -0.5)
        self.lora_b = nnx.LoRAParam(jnp.zeros((rank, d_out), dtype))
        self.scale = alpha / rank

    def __call__(self, x: jax.Array) -> jax.Array:
        base = self.base
        y = lora_dot(x, base.kernel[...], self.lora_a[...] * jnp.asarray(self.scale, x.dtype), self.lora_b[...])
        return y if base.bias is None else y + base.bias[...]

    def merged(self) -> nnx.Linear:
        k = self.base.kernel
        k.set_value(k[...] + (self.lora_a[...] @ self.lora_b[...] * self.scale).astype(k.dtype))
        return self.base


@jax.custom_vjp
def lora_dot(x, kernel, a, b):
    """x (kernel + a b), computed as x kernel + (x a) b: no product of full size beyond the layer's own."""
    return x @ kernel + (x @ a) @ b


# Under differentiation the adapter is folded into the kernel once per call (d_in x d_out, cheap next
# to the step's batch x tokens rows): the forward and the input gradient are then one product each,
# where the split form costs four more rank-r products of full size plus their sums, which XLA:CPU
# runs slowly (docs/benchmarks.md). The kernel is frozen: its cotangent is zero, and unused.
def _lora_dot_fwd(x, kernel, a, b):
    w = kernel + a @ b
    return x @ w, (x, w, a, b)


def _lora_dot_bwd(res, g):
    x, w, a, b = res
    xf, gf = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return g @ w.T, jnp.zeros_like(w), xf.T @ (gf @ b.T), (xf @ a).T @ gf


lora_dot.defvjp(_lora_dot_fwd, _lora_dot_bwd)


def _sites(model, targets, layers):
    """(parent module, attribute) of each adapted linear layer of the language model."""
    lm_layers = model.language_model.layers
    chosen = range(len(lm_layers)) if layers is None else layers
    for i in chosen:
        layer = lm_layers[i]
        for name in targets:
            parent = layer.self_attn if name in ATTENTION else layer.mlp
            yield parent, name


def add_lora(model, *, rank: int, alpha: float | None = None, targets=TARGETS, layers=None, seed: int = 0):
    """Adapters on `targets` (names of TARGETS) of the decoder `layers` (indices; default all), in place."""
    unknown = sorted(set(targets) - set(TARGETS))
    if unknown:
        raise ValueError(f"unknown LoRA targets {unknown}; known: {', '.join(TARGETS)}")
    if rank < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {rank}")
    key = jax.random.key(seed)
    for parent, name in _sites(model, targets, layers):
        base = getattr(parent, name)
        if isinstance(base, LoRALinear):
            raise ValueError(f"{name} already has a LoRA adapter")
        key, sub = jax.random.split(key)
        setattr(parent, name, LoRALinear(base, rank=rank, alpha=float(alpha or 2 * rank), key=sub))
    return model


def merge_lora(model):
    """Fold every adapter into its layer's kernel (in place); returns the model."""
    for parent, name in _sites(model, TARGETS, None):
        layer = getattr(parent, name)
        if isinstance(layer, LoRALinear):
            setattr(parent, name, layer.merged())
    return model


def has_lora(model) -> bool:
    return any(isinstance(getattr(p, n), LoRALinear) for p, n in _sites(model, TARGETS, None))
