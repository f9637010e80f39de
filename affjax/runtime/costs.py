"""XLA cost analysis of the programs a prefill runs (the engine records them; affjax.runtime.flops reads
the compiled HLO). Kept apart from the engine: nothing here runs a model.

`Program`: one compiled program as called (jitted function, abstract arguments, static keywords).
`program_costs(programs)`: {label: affjax.runtime.flops.xla_cost(...)}, compiled at the recorded shapes.
`prefill_cost(engine, batch)`: {label: FLOPs} of a batch's prefill, pooled or unpooled.
"""

from __future__ import annotations

import dataclasses
import functools

import jax

from affjax.runtime.flops import xla_cost

_COSTS: dict = {}   # (program, abstract args) -> affjax.runtime.flops.xla_cost of its compiled form


def abstract(tree):
    """Arrays -> ShapeDtypeStruct (weak types kept); other leaves as they are."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, weak_type=bool(getattr(x, "weak_type", False)))
                        if hasattr(x, "shape") else x, tree)


@dataclasses.dataclass
class Program:
    """One compiled program of a prefill, as called: the jitted function with its arguments
    (abstract: shapes and dtypes only) and static keywords. `label`: embed, pool@LAYER,
    layers[START:END), last_head / score_head, or prefill_fixed.

    Lowering traces the piece itself, as a call would: TRACES counts that trace once, and a later
    call at the same shapes and static arguments reuses it (no second trace, nothing counted).
    So a program first met by a cost analysis is counted there, never twice."""
    label: str
    fn: object
    args: tuple
    kwargs: dict

    def lower(self):
        fn, args, kw = self.fn, self.args, dict(self.kwargs)
        if isinstance(fn, functools.partial):
            fn, args, kw = fn.func, tuple(fn.args) + args, {**fn.keywords, **kw}
        return fn.lower(*args, **kw)


def program_costs(programs: list[Program]) -> dict[str, dict]:
    """{label: affjax.runtime.flops.xla_cost(...)} of each program, compiled at its recorded shapes with
    its static arguments (cached per shape; see Program for how TRACES counts them). A label seen
    twice gets a #k suffix."""
    out: dict[str, dict] = {}
    for p in programs:
        leaves, tree = jax.tree.flatten(p.args)
        fn = (p.fn.func, tuple(sorted(p.fn.keywords.items()))) if isinstance(p.fn, functools.partial) else p.fn
        key = (fn, tree, tuple((l.shape, str(l.dtype)) for l in leaves), tuple(sorted(p.kwargs.items(), key=str)))
        if key not in _COSTS:
            _COSTS[key] = xla_cost(p.lower().compile())
        label, k = p.label, 2
        while label in out:
            label, k = f"{p.label}#{k}", k + 1
        out[label] = _COSTS[key]
    return out

def prefill_cost(engine, batch, *, extra: int = 0, score: bool = False, unpooled: bool = False) -> dict:
    """{program label: FLOPs} of this batch's prefill, from XLA's cost analysis of the programs
    compiled at the same shapes and static arguments as a real prefill (bucketed mode: embed,
    each pool stage and layer group, the head; fixed mode: one prefill_fixed program). A pooled
    bucketed prefill is run once to learn its data-dependent buckets; `unpooled=True` gives the
    unpooled prefill of the same batch without running anything."""
    if unpooled:
        programs = engine.unpooled_programs(batch, extra=extra, score=score)
    else:
        rec, engine.record = engine.record, True
        try:
            out = engine.prefill(batch, extra=extra, score=score)
            jax.block_until_ready(out.logits if out.logits is not None else out.logprobs)
        finally:
            engine.record = rec
        programs = engine.programs
    return {k: v["flops"] for k, v in program_costs(programs).items()}
