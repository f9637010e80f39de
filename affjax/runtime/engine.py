"""Compiled inference for the speech LMs (Qwen2-Audio, Kimi-Audio): prefill, greedy decoding and
teacher-forced scoring, with optional Affinity Pooling stages between decoder layers.

What the engine asks of a model: `embed_batch(ids, span, audio_index, features, feature_lengths)`,
the input embeddings of a batch (its audio encoder included); `embed_next(ids)`, the input of a
generated or scored text token (Kimi-Audio: E(blank) + E(token), the two streams); and
`language_model` (the Qwen2 decoder: layers, final norm and head). A batch has the fields of
affjax.models.qwen2_audio.inputs.Batch (Kimi-Audio's has the same): `span` marks the audio spans
pooling merges, `valid`, `n_prompt`, and the continuations when scoring.

Layout of a prefill. Pooling stages at layers l_1 < l_2 < ... split the decoder into layer groups
[0, l_1), [l_1, l_2), ..., [l_k, L). Each group runs on its own sequence length:
- bucketed mode (default): every piece is its own jitted call; after a stage the host reads the
  batch's largest pooled length and slices the packed buffer to the smallest bucket that holds it,
  so each (piece, bucket, batch size) compiles once and thresholds are exact;
- fixed-capacity mode: the whole prefill is one jitted call, each stage's buffer sized from the
  retention cap (affjax.pooling.affinity.fixed_capacity_needed) with the overflow rule.
Each layer group keeps its own KV cache (its prompt length + max_new_tokens slots); decoding writes
slot n_g + step in group g. The greedy loop is one jitted lax.while_loop.

An oracle intervention (`Engine(model, oracle=...)`, affjax.pooling.oracle: merge each word's audio
tokens, drop words or tokens) runs where an input stage would, on the unpooled model, from each
row's word boundaries (`Batch.words`); bucketed mode only.

Fixed-rate controls (`Control`, affjax.pooling.uniform: uniform average pooling or evenly spaced
dropping, the paper's baselines at equal retention) run in place of the similarity stages of a
bucketed prefill (`prefill_rest`, `run_packed`), each row keeping the number of audio tokens given
for it at each stage (e.g. the count a similarity stage kept for that item).

Fixed-capacity `capacity` is one retention for every stage, or a tuple with one per stage, each a
fraction of the tokens a span has when it enters that stage. With `record` on, each prefill lists
the compiled programs it ran (`programs`); `program_costs`, `unpooled_programs` and `prefill_cost`
give XLA's cost analysis of them and of an unpooled prefill of the same batch (affjax.runtime.flops).

Under a device mesh (`Engine(model, mesh=...)`, affjax.runtime.sharding) the same code runs sharded: batch
inputs are placed with their rows over the `data` axis, the parameters stay as loaded (restored onto
their shards; a model on other devices is placed by the rules once), jit propagates the shardings
and the hidden states and KV caches are constrained by the logical-axis table. Host reads (pooled
buckets, fixed capacities, results) use global values, so every process of a multi-host run takes
the same decisions and gets back its own rows.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from affjax.models.layers import rope_cos_sin
from affjax.models.qwen2_audio.inputs import Batch
from affjax.pooling.affinity import fixed_capacity_needed, pool_stage, retention_slots
from affjax.pooling.oracle import Oracle, oracle_stage
from affjax.pooling.spec import PoolingConfig
from affjax.pooling.uniform import CONTROLS, uniform_stage
from affjax.runtime import costs, shapes
from affjax.runtime import sharding as shd
from affjax.runtime.compiles import TRACES  # noqa: F401  (the one compile counter, also read from here)
from affjax.runtime.compiles import traced as _traced

_JIT: dict = {}
_PREFILL_PIECES = ("embed", "pool", "group", "score_head", "last_head", "prefill_fixed")

# The bucketed mode's stage program is compiled without XLA:CPU's YNNPACK fusions, with the lag dots
# as multiply-and-sum (pool_stage(dots="reduce")): fastest so. Programs that keep the fusions (the
# one-program fixed-capacity prefill: its decoder layers run 4 % faster with them) use the
# matrix-vector form, which the fusions do not slow down. Other backends ignore the option.
POOL_COMPILER_OPTIONS = {"xla_cpu_experimental_ynn_fusion_type": ""}


@dataclasses.dataclass
class Seq:
    """The decoder's running sequence state (device arrays). N = current buffer length."""
    x: jax.Array       # ['B N D']
    valid: jax.Array   # Bool['B N']
    pos: jax.Array     # Float32['B N'] position ids (policy-dependent after a stage)
    size: jax.Array    # Float32['B N'] original tokens per slot
    span: jax.Array    # Int32['B N']
    slot_of: jax.Array  # Int32['B T0'] slot of each original token in this buffer (-1 = none)


jax.tree_util.register_dataclass(Seq, data_fields=[f.name for f in dataclasses.fields(Seq)], meta_fields=[])


def _label(name: str, kw: dict) -> str:
    if name == "group":
        return f"layers[{kw['start']}:{kw['end']})"
    if name == "pool":
        return f"pool@{kw['stage'].layer}"
    return name


# ----------------------------------------------------------------------------------------------
# Pure pieces (model = nnx.merge(graphdef, state) inside the jitted wrappers)


def embed_seq(model, ids, valid, span, audio_index, features, feature_lengths) -> Seq:
    return start_seq(model.embed_batch(ids, span, audio_index, features, feature_lengths), valid, span)


def start_seq(x, valid, span) -> Seq:
    """The running state of embedded inputs x ['B T D'] before any pooling: positions 0..T-1."""
    x = shd.constrain(x, "hidden")
    b, t = valid.shape
    pos = jnp.broadcast_to(jnp.arange(t, dtype=jnp.float32), (b, t))
    return Seq(x, valid, pos, jnp.ones((b, t), jnp.float32), span,
               jnp.where(valid, jnp.arange(t, dtype=jnp.int32)[None], -1))


def run_layers(model, seq: Seq, start: int, end: int, extra: int, proportional: bool, keep_cache: bool = True):
    """Layers [start, end) on the packed sequence; returns the new Seq and the group's KV cache,
    padded with `extra` free slots for decoding (none when keep_cache is False: scoring)."""
    lm = model.language_model
    cos, sin = rope_cos_sin(seq.pos, lm.cfg.head_dim, lm.cfg.rope_theta, seq.x.dtype)
    bias = jnp.log(jnp.maximum(seq.size, 1.0)) if proportional else None
    x, caches = seq.x, []
    for layer in lm.layers[start:end]:
        x, (k, v) = layer(x, cos, sin, seq.valid, bias)
        if keep_cache:
            pad = ((0, 0), (0, extra), (0, 0), (0, 0))
            caches.append((shd.constrain(jnp.pad(k, pad), "kv_cache"), shd.constrain(jnp.pad(v, pad), "kv_cache")))
    return dataclasses.replace(seq, x=shd.constrain(x, "hidden")), caches


def hidden_states(model, ids, valid, span, audio_index, features, feature_lengths) -> jax.Array:
    """The unpooled decoder output ['B T D'] (before the final norm) of a whole batch, no cache: the
    whole-sequence view parity checks and the bf16 gate compare (jit it: eager, every op compiles)."""
    seq = embed_seq(model, ids, valid, span, audio_index, features, feature_lengths)
    return run_layers(model, seq, 0, model.cfg.text.layers, 0, False, keep_cache=False)[0].x


def pool_seq(seq: Seq, stage, positions: str, capacity: int, retention, dots: str = "matvec", tau=None):
    """One stage. `stage`: a Stage, or its static part (Stage.static) with `tau` given: a float32
    scalar or per-row array, traced under jit (one program for every threshold)."""
    tau = stage.tau if tau is None else tau
    out = pool_stage(seq.x, seq.span, seq.valid, seq.pos, seq.size, tau=tau, window=stage.window,
                     capacity=capacity, weighted=stage.weighted, positions=positions, retention=retention,
                     dots=dots)
    return _after_stage(seq, out)


def _after_stage(seq: Seq, out) -> tuple[Seq, dict]:
    """The running state after a stage's packed output (a StageOut), and the stage's stats."""
    slot_of = jnp.where(seq.slot_of >= 0,
                        jnp.take_along_axis(out.group_of, jnp.maximum(seq.slot_of, 0), axis=1), -1)
    new = Seq(out.h, out.valid, out.pos, out.size, out.span, slot_of)
    return new, {"audio_in": out.audio_in, "audio_out": out.audio_out, "forced": out.forced,
                 "n_valid": out.n_valid}


def _embed_tokens(model, ids):
    """Input embeddings of text token ids (continuations appended to stored rows, affjax.eval.lslm)."""
    return model.embed_next(ids)


def _last_logits(model, seq: Seq, n_prompt):
    """Logits of the last prompt token (float32 ['B V'])."""
    slot = jnp.take_along_axis(seq.slot_of, jnp.maximum(n_prompt - 1, 0)[:, None], axis=1)[:, 0]
    h = jnp.take_along_axis(seq.x, jnp.maximum(slot, 0)[:, None, None], axis=1)[:, 0]
    return model.language_model.logits(h)


def _cont_logprobs(model, seq: Seq, n_prompt, cont_ids, cont_valid):
    """Log-probabilities ['B K'] of continuation token k, predicted at original token n_prompt-1+k."""
    k = cont_ids.shape[1]
    orig = jnp.minimum(n_prompt[:, None] - 1 + jnp.arange(k)[None], seq.slot_of.shape[1] - 1)
    slot = jnp.maximum(jnp.take_along_axis(seq.slot_of, jnp.maximum(orig, 0), axis=1), 0)
    h = jnp.take_along_axis(seq.x, slot[..., None], axis=1)
    logits = model.language_model.logits(h)
    lp = jax.nn.log_softmax(logits, axis=-1)
    tok = jnp.take_along_axis(lp, cont_ids[..., None], axis=-1)[..., 0]
    return jnp.where(cont_valid, tok, 0.0)


# ----------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Control:
    """Fixed-rate controls in place of a prefill's similarity stages: at stage k, row b keeps
    ``keep[k][b]`` audio tokens (clipped to 1 .. its audio tokens there), by uniform average pooling
    (``kind`` avg) or by keeping that many evenly spaced tokens (drop); affjax.pooling.uniform.
    A row holds at most one audio span (one clip of at most 30 s)."""
    kind: str
    keep: tuple  # per stage: Int['B']

    def __post_init__(self):
        if self.kind not in CONTROLS:
            raise ValueError(f"control kind must be one of {CONTROLS}, got {self.kind!r}")


@dataclasses.dataclass
class PrefillOut:
    logits: jax.Array | None            # ['B V'] last prompt token (generate)
    logprobs: jax.Array | None          # ['B K'] continuation log-probs (score)
    caches: list                        # per layer (K, V)
    group_len: list                     # per group: Int32['B'] valid prompt slots in its cache
    group_pos0: list                    # per group: Float32['B'] position id of the first decoded token
    group_bias: list                    # per group: Float32['B S_g'] key bias (proportional) or None
    stats: list                         # per stage: dict of Int['B'] arrays


@dataclasses.dataclass
class FrontRow:
    """One row after :meth:`Engine.front`, on the host: its valid prefix (n slots) only."""
    x: np.ndarray        # ['n D']
    pos: np.ndarray      # ['n']
    size: np.ndarray     # ['n']
    span: np.ndarray     # ['n']
    slot_of: np.ndarray  # ['n_prompt']
    n_prompt: int        # unpooled prompt length
    audio: list          # audio tokens before pooling, after each stage run so far
    lm: list             # valid LM tokens unpooled, after each stage run so far

    def length(self, cont=None) -> int:
        return len(self.x) + (0 if cont is None else len(cont))


@dataclasses.dataclass
class PackedRows:
    """Stored rows packed into one batch (:meth:`Engine.pack_rows`)."""
    seq: Seq
    n_prompt: np.ndarray
    cont_ids: np.ndarray | None
    cont_valid: np.ndarray | None
    rows: int      # real rows
    slots: int     # batch x bucket: the language model's first buffer
    tokens: int    # valid tokens in it


class Engine:
    """Holds the split model and the jitted pieces; shapes follow affjax.runtime.shapes."""

    def __init__(self, model, *, pooling: PoolingConfig | None = None, pool_mode: str = "bucketed",
                 capacity: float | None = None, eos_ids=(), pad_id: int = 0, mesh=None, oracle: Oracle | None = None):
        self.graphdef, self.state = nnx.split(model)
        self.cfg = model.cfg
        self.mesh = mesh  # jax.sharding.Mesh ("data", "model") or None (one device)
        if mesh is not None:
            pure = nnx.to_pure_dict(self.state)
            if not all(shd.on_mesh(x, mesh) for x in jax.tree.leaves(pure)):
                nnx.replace_by_pure_dict(self.state, shd.place_params(pure, mesh, self.cfg))
        self.pooling = pooling or PoolingConfig(stages=())
        if pool_mode not in ("bucketed", "fixed"):
            raise ValueError(f"pool_mode must be 'bucketed' or 'fixed', got {pool_mode!r}")
        if pool_mode == "fixed" and capacity is None and self.pooling.stages:
            raise ValueError("fixed-capacity mode needs --capacity (a fraction of the audio tokens)")
        if isinstance(capacity, (tuple, list)):
            # one retention per stage, each relative to the span lengths entering that stage
            capacity = tuple(float(c) for c in capacity)
            if len(capacity) != len(self.pooling.stages):
                raise ValueError(f"--capacity gives {len(capacity)} retentions for {len(self.pooling.stages)} "
                                 "pooling stages (give one, or one per stage)")
            if not all(0.0 < c <= 1.0 for c in capacity):
                raise ValueError(f"capacity retentions must lie in (0, 1], got {capacity}")
        self.pool_mode, self.capacity = pool_mode, capacity
        self.record = False   # when True, each prefill lists its compiled programs in self.programs
        self.programs: list[costs.Program] = []
        self.eos_ids = tuple(int(e) for e in eos_ids)
        self.pad_id = pad_id
        L = self.cfg.text.layers
        for st in self.pooling.stages:
            if not 0 <= st.layer < L:
                raise ValueError(f"pooling stage at layer {st.layer} outside 0..{L - 1}")
        cuts = [st.layer for st in self.pooling.stages]
        self.groups = list(zip([0] + cuts, cuts + [L]))  # group g: layers [start, end)
        # an oracle intervention (affjax.pooling.oracle) takes the input stage's place, on the unpooled model
        if oracle is not None and self.pooling.stages:
            raise ValueError("an oracle intervention runs without pooling stages")
        self.oracle = oracle

    @property
    def front_stages(self) -> int:
        """Stages :meth:`front` runs: an input stage (layer 0) or an oracle intervention, or none."""
        return int(self.oracle is not None or bool(self.pooling.stages and self.pooling.stages[0].layer == 0))

    # -- jitted wrappers ------------------------------------------------------------------------
    def jitted(self, name, fn, static=()):
        """`fn(model, ...)` jitted over the parameter state; shared by every Engine of the same
        model structure (the graphdef is a static argument), so settings never recompile it."""
        key = (name, fn, tuple(static))
        if key not in _JIT:
            def wrapped(state, *args, graphdef, **kw):
                _traced(name)
                return fn(nnx.merge(graphdef, state), *args, **kw)
            _JIT[key] = jax.jit(wrapped, static_argnames=("graphdef",) + tuple(static))
        return self._in_mesh(self._rec(name, functools.partial(_JIT[key], graphdef=self.graphdef)))

    def _in_mesh(self, f):
        """`f` called with the engine's mesh in context (`constrain` reads it); `f` without a mesh.
        A partial stays a partial (Program.lower and program_costs unpack it)."""
        if self.mesh is None:
            return f
        if isinstance(f, functools.partial):
            return _InMesh(self.mesh, f.func, *f.args, **f.keywords)
        return _InMesh(self.mesh, f)

    def _rec(self, name, f):
        """`f`, noting each call in self.programs while self.record is on (prefill pieces only)."""
        if not self.record or name not in _PREFILL_PIECES:
            return f

        def call(*args, **kw):
            self.programs.append(costs.Program(_label(name, kw), f, costs.abstract(args), kw))
            return f(*args, **kw)
        return call

    def _put(self, x):
        """A batch array (rows first) on the device; under a mesh, rows over the data axis (host
        arrays hold this process's rows; device arrays are taken as they are)."""
        if x is None or self.mesh is None or isinstance(x, jax.Array):
            return None if x is None else jnp.asarray(x)
        return shd.put_rows(self.mesh, x)

    def _local(self, x):
        """This process's rows of a result, on the host (all rows on one process)."""
        if self.mesh is None:
            return jax.device_get(x)
        return jax.tree.map(lambda a: shd.local_rows(a, self.mesh), x)

    def put(self, x):
        """A host batch array (rows first) on the device, rows over the mesh's data axis."""
        return self._put(x)

    def host(self, x):
        """This process's rows of a device result (a pytree), on the host."""
        return self._local(x)

    def device_batch(self, batch: Batch):
        return tuple(map(self._put, (batch.ids, batch.valid, batch.span, batch.audio_index, batch.features,
                                     batch.feature_lengths)))

    # -- prefill ----------------------------------------------------------------------------------
    def prefill(self, batch: Batch, *, extra: int = 0, score: bool = False) -> PrefillOut:
        """Run the prompt (and, for score, the continuation) through the model. `batch` holds this
        process's rows (all of them on one process)."""
        self.programs = []
        if self.mesh is not None:  # several processes: pad to the shapes every process agrees on
            batch = shd.globalize_batch(batch, self.mesh, int(self.cfg.audio.output_lengths(batch.features.shape[-1])))
        if self.pool_mode == "fixed" and self.pooling.stages:
            return self._prefill_fixed(batch, extra=extra, score=score)
        seq, stats = self.front(batch)
        return self.prefill_rest(seq, batch.n_prompt, stats, extra=extra, score=score, cont_ids=batch.cont_ids,
                                 cont_valid=batch.cont_valid)

    def front(self, batch: Batch) -> tuple[Seq, list]:
        """Bucketed mode, first part: the audio encoder, projector and embeddings, then the input
        stage (a stage at layer 0) if there is one. Returns the sequence and that stage's stats."""
        seq = self.jitted("embed", embed_seq)(self.state, *self.device_batch(batch))
        stats = []
        if self.oracle is not None:
            if batch.words is None:
                raise ValueError("an oracle intervention needs each item's word boundaries (Batch.words)")
            seq, st = self._in_mesh(oracle_program)(seq, self._put(batch.words), self._put(batch.seeds),
                                                    oracle=self.oracle, positions=self.pooling.positions)
            stats.append(st)
            seq = self._fit(seq, st)
        elif self.pooling.stages and self.pooling.stages[0].layer == 0:
            seq, st = self.pool_bucketed(seq, self.pooling.stages[0])
            stats.append(st)
        return seq, stats

    def front_rows(self, batch: Batch) -> list[FrontRow]:
        """:meth:`front` of a batch, each real row's valid prefix kept on the host (two-pass
        scheduling: rows of many batches wait there, then :meth:`pack_rows` regroups them)."""
        seq, stats = self.host(self.front(batch))
        out = []
        for b in range(batch.rows):
            n, npr = int(seq.valid[b].sum()), int(batch.n_prompt[b])
            out.append(FrontRow(x=seq.x[b, :n], pos=seq.pos[b, :n], size=seq.size[b, :n], span=seq.span[b, :n],
                                slot_of=seq.slot_of[b, :npr], n_prompt=npr,
                                audio=[int((batch.span[b] > 0).sum())] + [int(s["audio_out"][b]) for s in stats],
                                lm=[npr] + [int(s["n_valid"][b]) for s in stats]))
        return out

    def pack_rows(self, rows: list[FrontRow], conts: list | None, batch_size: int) -> PackedRows:
        """Stored front rows (plus, for scoring, each row's continuation ids appended as text
        tokens) packed into one static-shape batch: the sequence bucket of the longest row."""
        T = shapes.bucket(max(r.length(c) for r, c in zip(rows, conts or [None] * len(rows))))
        T0 = shapes.bucket(max(r.n_prompt + (0 if conts is None else len(c)) for r, c in
                               zip(rows, conts or [None] * len(rows))))
        d = rows[0].x.shape[-1]
        x = np.zeros((batch_size, T, d), rows[0].x.dtype)
        valid = np.zeros((batch_size, T), bool)
        pos = np.zeros((batch_size, T), np.float32)
        size = np.ones((batch_size, T), np.float32)
        span = np.zeros((batch_size, T), np.int32)
        slot_of = np.full((batch_size, T0), -1, np.int32)
        n_prompt = np.zeros((batch_size,), np.int32)
        for b, r in enumerate(rows):
            n = len(r.x)
            x[b, :n], pos[b, :n], size[b, :n], span[b, :n] = r.x, r.pos, r.size, r.span
            valid[b, :n] = True
            slot_of[b, :r.n_prompt] = r.slot_of
            n_prompt[b] = r.n_prompt
        cont_ids = cont_valid = None
        if conts is not None:
            K = shapes.bucket(max(len(c) for c in conts), shapes.CONT_BUCKETS, "continuation")
            cont_ids = np.zeros((batch_size, K), np.int32)
            cont_valid = np.zeros((batch_size, K), bool)
            for b, c in enumerate(conts):
                cont_ids[b, :len(c)] = c
                cont_valid[b, :len(c)] = True
            emb = np.asarray(self.host(self.jitted("embed_tokens", _embed_tokens)(self.state, self.put(cont_ids))))
            for b, (r, c) in enumerate(zip(rows, conts)):
                n, k = len(r.x), len(c)
                x[b, n:n + k] = emb[b, :k]
                valid[b, n:n + k] = True
                # a continuation token is text: its original position under first/mean, its slot under reindex
                pos[b, n:n + k] = (n if self.pooling.positions == "reindex" else r.n_prompt) + np.arange(k)
                slot_of[b, r.n_prompt:r.n_prompt + k] = n + np.arange(k)
        seq = Seq(*map(self.put, (x, valid, pos, size, span, slot_of)))
        return PackedRows(seq, n_prompt, cont_ids, cont_valid, rows=len(rows), slots=batch_size * T,
                          tokens=int(valid.sum()))

    def run_packed(self, packed: PackedRows, n_front_stages: int, *, max_new_tokens: int = 0,
                   control: Control | None = None):
        """The rest of the prefill for packed rows, then scoring (continuations given: per-row
        summed log-probs) or greedy decoding (token lists). Returns (results, stats of the stages
        run here), on the host. `control`: fixed-rate controls in place of the stages run here."""
        score = packed.cont_ids is not None
        out = self.prefill_rest(packed.seq, packed.n_prompt, [None] * n_front_stages,
                                extra=0 if score else max_new_tokens, score=score, cont_ids=packed.cont_ids,
                                cont_valid=packed.cont_valid, control=control)
        later = self.host(out.stats[n_front_stages:])
        if score:
            return np.asarray(self.host(out.logprobs), np.float64).sum(1)[:packed.rows], later
        return self.decode(out, packed.rows, max_new_tokens), later

    def pool_bucketed(self, seq: Seq, stage, control: str | None = None, keep=None) -> tuple[Seq, dict]:
        """One stage at full capacity, then the buffer sliced to the bucket of the longest row. With
        `control` (avg or drop) the fixed-rate control runs in its place, row b keeping keep[b] audio
        tokens (Int['B'], traced: one program for every count)."""
        if control is not None:
            seq, st = self._in_mesh(control_program)(seq, self._put(np.asarray(keep, np.int32)), kind=control,
                                                     positions=self.pooling.positions)
            return self._fit(seq, st), st
        pool = self._in_mesh(self._rec("pool", pool_program))
        # tau traced (a float32 scalar): stages that differ only in tau share one program
        seq, st = pool(seq, np.float32(stage.tau), stage=stage.static, positions=self.pooling.positions,
                       capacity=seq.x.shape[1], retention=None)
        return self._fit(seq, st), st

    @staticmethod
    def _fit(seq: Seq, st: dict) -> Seq:
        """A stage's full-capacity output sliced to the bucket of the batch's longest row."""
        n_max = int(shd.host_value(st["n_valid"]).max())  # over every process's rows
        return slice_seq(seq, min(shapes.bucket(max(n_max, 1)), seq.x.shape[1]))

    def prefill_rest(self, seq: Seq, n_prompt, stats: list, *, extra: int = 0, score: bool = False,
                     cont_ids=None, cont_valid=None, control: Control | None = None) -> PrefillOut:
        """Bucketed mode, the rest of a prefill: the layer groups and the stages not yet applied
        (``len(stats)`` of them were, by :meth:`front`), then the head. `control`: fixed-rate controls
        in place of those stages (its `keep` has one entry per stage of the pooling setting)."""
        if control is not None and len(control.keep) != len(self.pooling.stages):
            raise ValueError(f"control gives counts for {len(control.keep)} stages, the pooling has "
                             f"{len(self.pooling.stages)}")
        stats = list(stats)
        caches, group_len, group_pos0, group_bias = [], [], [], []
        n_prompt = self._put(n_prompt)
        prop = self.pooling.proportional
        for g, (start, end) in enumerate(self.groups):
            if g > len(stats):
                kind, keep = (control.kind, control.keep[g - 1]) if control else (None, None)
                seq, st = self.pool_bucketed(seq, self.pooling.stages[g - 1], kind, keep)
                stats.append(st)
            if end > start:
                run = self.jitted("group", run_layers, static=("start", "end", "extra", "proportional", "keep_cache"))
                seq, c = run(self.state, seq, start=start, end=end, extra=extra, proportional=prop and g > 0,
                             keep_cache=not score)
                caches += c
            n_g = jnp.sum(seq.valid, axis=1).astype(jnp.int32)
            group_len.append(n_g)
            group_pos0.append(_first_decode_pos(self.pooling.positions, n_prompt, n_g))
            group_bias.append(_pad_bias(seq, extra) if prop and g > 0 else None)
        if score:
            f = self.jitted("score_head", _cont_logprobs)
            lp = f(self.state, seq, n_prompt, self._put(cont_ids), self._put(cont_valid))
            return PrefillOut(None, lp, caches, group_len, group_pos0, group_bias, stats)
        f = self.jitted("last_head", _last_logits)
        return PrefillOut(f(self.state, seq, n_prompt), None, caches, group_len, group_pos0, group_bias, stats)

    def _prefill_fixed(self, batch: Batch, *, extra: int, score: bool) -> PrefillOut:
        """Fixed-capacity mode: one jitted prefill; buffers sized from the retention cap."""
        span = batch.span
        valid = batch.valid
        if isinstance(self.capacity, tuple):
            # one retention per stage: stage k keeps ceil(r_k * T) of the T tokens each span has there
            r = self.capacity
            need = chained_capacity(span, valid, r)
        else:
            # one retention for every stage: the first stage's cap bounds the later ones (they only merge more)
            r = float(self.capacity)
            need = [int(fixed_capacity_needed(span, valid, r).max())] * len(self.pooling.stages)
        need = shd.agree_max(need) if self.mesh is not None else need  # the largest over every process
        caps = tuple(min(int(shapes.bucket(int(c))), batch.ids.shape[1]) for c in need)
        name = "prefill_fixed"
        fn = self.jitted(name, _prefill_fixed_body, static=("groups", "stages", "positions", "caps", "retention",
                                                          "extra", "proportional", "score"))
        out = fn(self.state, *self.device_batch(batch), self._put(batch.n_prompt),
                 None if not score else self._put(batch.cont_ids),
                 None if not score else self._put(batch.cont_valid),
                 tuple(np.float32(st.tau) for st in self.pooling.stages),  # traced: no compile per tau
                 groups=tuple(self.groups), stages=tuple(st.static for st in self.pooling.stages),
                 positions=self.pooling.positions,
                 caps=caps, retention=r, extra=extra, proportional=self.pooling.proportional, score=score)
        head, caches, group_len, group_pos0, group_bias, stats = out
        return PrefillOut(None if score else head, head if score else None, caches, group_len, group_pos0,
                          group_bias, stats)

    # -- compiled-program costs (affjax.runtime.flops) -------------------------------------------------------
    def unpooled_programs(self, batch: Batch, *, extra: int = 0, score: bool = False) -> list[costs.Program]:
        """The programs an unpooled prefill of `batch` runs (embed, all layers, head), built from
        shapes alone: nothing runs (lowering the embedding for its output shape traces it; see
        costs.Program for how TRACES counts that)."""
        rec = self.record
        self.record = False
        try:
            L = self.cfg.text.layers
            state, dev = costs.abstract(self.state), costs.abstract(self.device_batch(batch))
            embed = costs.Program("embed", self.jitted("embed", embed_seq), (state,) + dev, {})
            seq = costs.abstract(embed.lower().out_info)
            gkw = dict(start=0, end=L, extra=extra, proportional=False, keep_cache=not score)
            group = costs.Program(f"layers[0:{L})", self.jitted("group", run_layers, static=tuple(gkw)), (state, seq), gkw)
            n_prompt = jax.ShapeDtypeStruct(batch.n_prompt.shape, jnp.int32)
            if score:
                cont = costs.abstract((jnp.asarray(batch.cont_ids), jnp.asarray(batch.cont_valid)))
                head = costs.Program("score_head", self.jitted("score_head", _cont_logprobs), (state, seq, n_prompt) + cont, {})
            else:
                head = costs.Program("last_head", self.jitted("last_head", _last_logits), (state, seq, n_prompt), {})
            return [embed, group, head]
        finally:
            self.record = rec

    # -- public jobs --------------------------------------------------------------------------------
    def score(self, batch: Batch) -> tuple[np.ndarray, list]:
        """Per-row sum of continuation log-probs (float64 on host) and per-stage stats."""
        out = self.prefill(batch, score=True)
        lp = np.asarray(self._local(out.logprobs), np.float64)
        return lp.sum(1), [self._local(s) for s in out.stats]

    def generate(self, batch: Batch, max_new_tokens: int) -> tuple[list[list[int]], list]:
        out = self.prefill(batch, extra=max_new_tokens)
        return self.decode(out, batch.rows, max_new_tokens), [self._local(s) for s in out.stats]

    def decode(self, out: PrefillOut, rows: int, max_new_tokens: int) -> list[list[int]]:
        """Greedy tokens (EOS excluded) of the first `rows` rows after a prefill with
        ``extra=max_new_tokens``."""
        loop = self.jitted("decode", _decode_loop, static=("groups", "max_new", "eos", "pad_id"))
        b = out.group_len[0].shape[0] if self.mesh is None else shd.local_count(self.mesh, out.group_len[0].shape[0])
        row_ok = self._put(np.arange(b) < rows)
        tokens, lengths = loop(self.state, out.logits, out.caches, out.group_len, out.group_pos0, out.group_bias,
                               row_ok, groups=tuple(self.groups), max_new=max_new_tokens, eos=self.eos_ids,
                               pad_id=self.pad_id)
        tokens, lengths = self._local(tokens), self._local(lengths)
        return [tokens[b, : lengths[b]].tolist() for b in range(rows)]


class _InMesh(functools.partial):
    """A call of a jitted piece inside `jax.set_mesh(mesh)`."""

    def __new__(cls, mesh, func, *args, **kw):
        self = super().__new__(cls, func, *args, **kw)
        self.mesh = mesh
        return self

    def __call__(self, *args, **kw):
        with jax.set_mesh(self.mesh):
            return super().__call__(*args, **kw)


@functools.partial(jax.jit, static_argnames=("stage", "positions", "capacity", "retention"),
                   compiler_options=POOL_COMPILER_OPTIONS)
def pool_program(seq, tau=None, *, stage, positions, capacity, retention):
    """`stage` static: pass Stage.static with `tau` (float32, traced) so every threshold of a stage
    shape shares one program; a whole Stage with tau=None bakes its tau in (one program per tau)."""
    _traced("pool")
    return pool_seq(seq, stage, positions, capacity, retention, dots="reduce", tau=tau)


@functools.partial(jax.jit, static_argnames=("oracle", "positions"))
def oracle_program(seq: Seq, words, seeds, *, oracle: Oracle, positions: str):
    """An oracle intervention on the embedded inputs, at full capacity (affjax.pooling.oracle)."""
    _traced("oracle")
    out = oracle_stage(seq.x, seq.span, seq.valid, seq.pos, seq.size, words, seeds, oracle=oracle,
                       capacity=seq.x.shape[1], positions=positions)
    return _after_stage(seq, out)


@functools.partial(jax.jit, static_argnames=("kind", "positions"), compiler_options=POOL_COMPILER_OPTIONS)
def control_program(seq: Seq, keep, *, kind: str, positions: str):
    """A fixed-rate control stage at full capacity, row b keeping keep[b] audio tokens (affjax.pooling.uniform)."""
    _traced("control")
    out = uniform_stage(seq.x, seq.span, seq.valid, seq.pos, seq.size, keep, kind=kind, capacity=seq.x.shape[1],
                        positions=positions)
    return _after_stage(seq, out)


def chained_capacity(span, valid, retentions) -> list[int]:
    """Host bound on each stage's valid length when stage k keeps at most max(1, ceil(r_k * T)) of
    the T tokens each audio span has when it enters stage k (largest over the batch's rows)."""
    span, valid = np.asarray(span), np.asarray(valid, bool)
    text = np.sum(valid & (span <= 0), axis=1)
    lengths = [np.bincount(span[b][valid[b] & (span[b] > 0)]) for b in range(span.shape[0])]
    out = []
    for r in retentions:
        lengths = [retention_slots(n, r) for n in lengths]
        out.append(max(int(text[b]) + int(n.sum()) for b, n in enumerate(lengths)))
    return out


def _first_decode_pos(positions: str, n_prompt, n_g):
    """Position id of the first decoded token in a layer group: the unpooled prompt length under
    `first`/`mean`, the group's own next id under `reindex` (docs/pooling.md section 3)."""
    return (n_g if positions == "reindex" else n_prompt).astype(jnp.float32)


def slice_seq(seq: Seq, n: int) -> Seq:
    if n == seq.x.shape[1]:
        return seq
    return _slice_jit(seq, n=n)


@functools.partial(jax.jit, static_argnames="n")
def _slice_jit(seq: Seq, n: int) -> Seq:
    """The first `n` slots: one program, not one dispatch per array."""
    return Seq(seq.x[:, :n], seq.valid[:, :n], seq.pos[:, :n], seq.size[:, :n], seq.span[:, :n], seq.slot_of)


def _pad_bias(seq: Seq, extra: int):
    bias = jnp.where(seq.valid, jnp.log(jnp.maximum(seq.size, 1.0)), 0.0)
    return jnp.pad(bias, ((0, 0), (0, extra)))


def _prefill_fixed_body(model, ids, valid, span, audio_index, features, feature_lengths, n_prompt, cont_ids,
                        cont_valid, taus, **static):
    seq = embed_seq(model, ids, valid, span, audio_index, features, feature_lengths)
    return prefill_seq(model, seq, n_prompt, cont_ids, cont_valid, taus, **static)


def prefill_seq(model, seq: Seq, n_prompt, cont_ids, cont_valid, taus, *, groups, stages, positions, caps,
                retention, extra, proportional, score):
    """The fixed-capacity prefill from embedded inputs: layer groups with a pooling stage before
    each but the first. `stages`: each stage's static part (Stage.static); `taus`: their thresholds,
    float32 (traced). Differentiable: training runs it with score=True (affjax.train)."""
    caches, group_len, group_pos0, group_bias, stats = [], [], [], [], []
    for g, (start, end) in enumerate(groups):
        if g > 0:
            r = retention[g - 1] if isinstance(retention, tuple) else retention
            seq, st = pool_seq(seq, stages[g - 1], positions, caps[g - 1], r, tau=taus[g - 1])
            stats.append(st)
        seq, c = run_layers(model, seq, start, end, extra, proportional and g > 0, keep_cache=not score)
        caches += c
        n_g = jnp.sum(seq.valid, axis=1).astype(jnp.int32)
        group_len.append(n_g)
        group_pos0.append(_first_decode_pos(positions, n_prompt, n_g))
        group_bias.append(_pad_bias(seq, extra) if proportional and g > 0 else None)
    head = _cont_logprobs(model, seq, n_prompt, cont_ids, cont_valid) if score else _last_logits(model, seq, n_prompt)
    return head, caches, group_len, group_pos0, group_bias, stats


@dataclasses.dataclass
class DecodeState:
    """The greedy loop's carry (one lax.while_loop): step, tokens so far, per-row done flags and
    lengths (EOS excluded), and the per-layer KV caches."""
    step: jax.Array       # Int32[]
    tokens: jax.Array     # Int32['B max_new']
    done: jax.Array       # Bool['B']
    lengths: jax.Array    # Int32['B']
    caches: list          # per layer (K, V), each ['B S_g kv_heads head_dim']


jax.tree_util.register_dataclass(DecodeState, data_fields=[f.name for f in dataclasses.fields(DecodeState)],
                                 meta_fields=[])


def _decode_loop(model, first_logits, caches, group_len, group_pos0, group_bias, row_ok, *, groups, max_new,
                 eos, pad_id):
    """Greedy decoding as one lax.while_loop. Returns tokens ['B max_new'] and lengths ['B'] (EOS excluded)."""
    lm = model.language_model
    eos_arr = jnp.asarray(eos if eos else (-1,), jnp.int32)
    b = first_logits.shape[0]
    first = jnp.argmax(first_logits, axis=-1).astype(jnp.int32)
    is_eos = jnp.isin(first, eos_arr)
    init = DecodeState(step=jnp.int32(0), tokens=jnp.full((b, max_new), pad_id, jnp.int32).at[:, 0].set(first),
                       done=~row_ok | is_eos, lengths=jnp.where(is_eos, 0, 1).astype(jnp.int32), caches=caches)

    def cond(st: DecodeState):
        return (st.step + 1 < max_new) & ~jnp.all(st.done)

    def body(st: DecodeState) -> DecodeState:
        tok = jax.lax.dynamic_slice_in_dim(st.tokens, st.step, 1, axis=1)  # ['B 1']
        x = model.embed_next(tok)
        new_caches, li = [], 0
        for g, (start, end) in enumerate(groups):
            write = (group_len[g] + st.step)[:, None]
            pos = (group_pos0[g] + st.step)[:, None]
            cos, sin = rope_cos_sin(pos, lm.cfg.head_dim, lm.cfg.rope_theta, x.dtype)
            s_len = st.caches[li][0].shape[1] if end > start else 0
            key_valid = jnp.arange(s_len)[None, :] <= write
            for layer in lm.layers[start:end]:
                x, kv = layer(x, cos, sin, key_valid, group_bias[g], cache=st.caches[li], write=write)
                new_caches.append(kv)
                li += 1
        nxt = jnp.argmax(lm.logits(x[:, 0]), axis=-1).astype(jnp.int32)
        is_eos = jnp.isin(nxt, eos_arr)
        nxt = jnp.where(st.done, pad_id, nxt)
        return DecodeState(step=st.step + 1,
                           tokens=jax.lax.dynamic_update_slice_in_dim(st.tokens, nxt[:, None], st.step + 1, axis=1),
                           done=st.done | is_eos, lengths=st.lengths + (~st.done & ~is_eos).astype(jnp.int32),
                           caches=new_caches)

    final = jax.lax.while_loop(cond, body, init)
    return final.tokens, final.lengths
