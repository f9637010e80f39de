"""Oracle interventions on a speech LM's audio tokens, from word boundaries (the paper's Fig. 2-3).

Given where each word of the clip lies in time (seconds, from Whisper's alignment heads:
affjax.eval.alignment), the audio span of a row is changed before the language model sees it:

- ``merge-words``: the tokens of each word become one token, their plain mean; tokens that lie in
  no word (silence, the gaps DTW leaves) are kept as they are (``gaps=keep``, the default) or each
  run of them becomes one token too (``gaps=merge``);
- ``drop-words:p=P``: the tokens of ``round(P n)`` of the row's n words, chosen at random, are
  removed;
- ``drop-random:p=P``: ``round(P T)`` of the span's T tokens, chosen at random, are removed;
- ``drop-uniform:p=P``: ``T - round(P T)`` evenly spaced tokens are kept (at least one), the
  middle one of each of that many equal stretches (the ``drop`` control of affjax.pooling.uniform).

Audio token i of a span covers ``[i d, (i + 1) d)`` seconds, d = 40 ms for Whisper-style encoders
followed by Qwen2-Audio's stride-2 pool (20 ms frames, pooled in pairs); it belongs to the word
whose ``[start, end)`` holds its centre ``(i + 1/2) d``, or to none; a centre on a boundary (within
0.1 ms) goes to the word starting there. A word shorter than d may hold no centre: it then has no
token of its own (merging or dropping it changes nothing).

Randomness is per row: the j-th word or token draws ``uniform(fold_in(key(seed), j))`` and the
``round(P n)`` smallest draws are removed, so a row's result never depends on its padding or batch.
Everything runs under jit at static shapes, the conventions of the pooling stages: a row holds
one audio span; words come padded to a fixed count W (padding words have ``start == end``); the
output is packed into a buffer of static capacity C as :func:`affjax.pooling.uniform.pack_groups`
packs it (``StageOut``), so the engine treats an intervention like an input pooling stage.
"""

from __future__ import annotations

import dataclasses
import re
import zlib

import jax
import jax.numpy as jnp

from affjax.pooling.affinity import StageOut
from affjax.pooling.uniform import pack_groups, uniform_stage

TOKEN_SECONDS = 0.04
TIE_SECONDS = 1e-4
KINDS = ("merge-words", "drop-words", "drop-random", "drop-uniform")
GAPS = ("keep", "merge")


@dataclasses.dataclass(frozen=True)
class Oracle:
    """One intervention: ``kind`` (of KINDS), the fraction ``p`` removed (drop-*), the ``seed`` of the
    random ones (each item's seed is this plus a hash of its id), ``gaps`` (merge-words)."""

    kind: str
    p: float = 0.0
    seed: int = 0
    gaps: str = "keep"

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"oracle kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not 0.0 <= self.p <= 1.0:
            raise ValueError(f"oracle p must lie in [0, 1], got {self.p}")
        if self.gaps not in GAPS:
            raise ValueError(f"oracle gaps must be one of {', '.join(GAPS)}, got {self.gaps!r}")
        if self.kind == "merge-words" and self.p:
            raise ValueError("merge-words takes no p")

    def to_text(self) -> str:
        if self.kind == "merge-words":
            return self.kind + (f":gaps={self.gaps}" if self.gaps != "keep" else "")
        return f"{self.kind}:p={self.p!r}" + (f",seed={self.seed}" if self.seed else "")

    @property
    def random(self) -> bool:
        return self.kind in ("drop-words", "drop-random")


def parse_oracle(text: str) -> Oracle:
    """``KIND[:key=value,...]``, e.g. ``merge-words``, ``merge-words:gaps=merge``, ``drop-words:p=0.3``,
    ``drop-random:p=0.5,seed=1``, ``drop-uniform:p=0.5``."""
    kind, _, rest = text.strip().partition(":")
    kw = {}
    for part in filter(None, (s.strip() for s in rest.split(","))):
        m = re.fullmatch(r"(p|seed|gaps)=(.+)", part)
        if m is None:
            raise ValueError(f"oracle {text!r}: expected KEY=VALUE with KEY p, seed or gaps, got {part!r}")
        k, v = m.groups()
        try:
            kw[k] = float(v) if k == "p" else int(v) if k == "seed" else v
        except ValueError:
            raise ValueError(f"oracle {text!r}: bad value for {k}: {v!r}") from None
    return Oracle(kind, **kw)


def item_seed(oracle: Oracle, item_id: str) -> int:
    """An item's seed: the run's seed and its id (so each item draws its own, whatever its batch)."""
    return (oracle.seed * 1_000_003 + zlib.crc32(item_id.encode())) % 2 ** 31


def token_words(span, valid, words, token_seconds: float = TOKEN_SECONDS):
    """Word index of each slot's audio token, Int32['B N'], -1 for text, padding and tokens in no
    word. span: Int['B N'] (> 0 audio), valid: Bool['B N'], words: Float['B W 2'] [start, end) seconds."""
    audio = valid & (span > 0)
    i = jnp.cumsum(audio, axis=1, dtype=jnp.int32) - 1
    # + TIE_SECONDS: a centre on a boundary (common: DTW times and centres are both on the 20 ms grid)
    # belongs to the word that starts there, whatever float32 rounding does to either
    centre = (i.astype(jnp.float32) + 0.5) * jnp.float32(token_seconds) + jnp.float32(TIE_SECONDS)
    start, end = words[..., 0].astype(jnp.float32), words[..., 1].astype(jnp.float32)
    inside = audio[..., None] & (centre[..., None] >= start[:, None, :]) & (centre[..., None] < end[:, None, :])
    return jnp.where(inside.any(-1), jnp.argmax(inside, axis=-1), -1).astype(jnp.int32)


def _smallest(keys, index, mask, k):
    """Per row, the k True slots of mask ['B M'] whose draws are smallest; draw = uniform number
    index[b, m] of row b's key, so a row's choice never depends on padding or its batch."""
    draw = jax.vmap(lambda key, idx: jax.vmap(lambda j: jax.random.uniform(jax.random.fold_in(key, j)))(idx))
    u = jnp.where(mask, draw(keys, index), 2.0)  # masked-out slots sort last
    order = jnp.argsort(u, axis=1)
    rank = jnp.zeros(mask.shape, jnp.int32).at[jnp.arange(mask.shape[0])[:, None], order].set(
        jnp.arange(mask.shape[1], dtype=jnp.int32)[None, :])
    return mask & (rank < k[:, None])


def _count(p: float, n):
    """round(p n) (halves up), in int32."""
    return jnp.floor(jnp.float32(p) * n.astype(jnp.float32) + 0.5).astype(jnp.int32)


def oracle_stage(h, span, valid, pos, size, words, seeds, *, oracle: Oracle, capacity: int,
                 positions: str = "first", token_seconds: float = TOKEN_SECONDS) -> StageOut:
    """One intervention over a padded batch, in ``pool_stage``'s packed form.

    h: Float['B N D']; span: Int['B N'] (> 0: the row's one audio span); valid: Bool['B N'];
    pos, size: Float['B N']; words: Float['B W 2'] [start, end) seconds (padding: start == end);
    seeds: Int['B'] (random kinds). ``capacity`` C: static output length (N always suffices).
    """
    valid = valid.astype(bool)
    span = span.astype(jnp.int32)
    audio = valid & (span > 0)
    n = jnp.sum(audio, axis=1, dtype=jnp.int32)
    if oracle.kind == "drop-uniform":
        return uniform_stage(h, span, valid, pos, size, n - _count(oracle.p, n), kind="drop", capacity=capacity,
                             positions=positions)
    word = token_words(span, valid, words, token_seconds)
    keys = jax.vmap(jax.random.key)(jnp.asarray(seeds).astype(jnp.uint32)) if oracle.random else None
    if oracle.kind == "merge-words":
        prev = jnp.pad(word, ((0, 0), (1, 0)), constant_values=-2)[:, :-1]  # -2: no token before the first
        first_audio = audio & ~jnp.pad(audio, ((0, 0), (1, 0)))[:, :-1]
        new = (word != prev) | (word < 0 if oracle.gaps == "keep" else False)
        start = valid & (~audio | first_audio | new)
        member = valid
    else:
        if oracle.kind == "drop-words":
            real = words[..., 1] > words[..., 0]
            w_index = jnp.broadcast_to(jnp.arange(real.shape[1]), real.shape)
            dropped = _smallest(keys, w_index, real, _count(oracle.p, jnp.sum(real, axis=1)))  # ['B W']
            gone = (word >= 0) & jnp.take_along_axis(dropped, jnp.maximum(word, 0), axis=1)
        else:  # drop-random: draw j belongs to the span's token j
            gone = _smallest(keys, jnp.cumsum(audio, axis=1) - 1, audio, _count(oracle.p, n))
        start = member = valid & ~(audio & gone)
    return pack_groups(h, span, valid, pos, size, start, member, capacity=capacity, positions=positions)


oracle_stage_jit = jax.jit(oracle_stage, static_argnames=("oracle", "capacity", "positions", "token_seconds"))
