"""Training data: the frozen audio encoder's outputs cached on disk, examples, and a resumable
batch order.

Encoder cache. Each clip is encoded once, by the checkpoint's own audio tower, and stored at its
valid frames (float16, the tower's output before the projector) in a folder keyed by a fingerprint
of the tower's weights, so every run and epoch on the same checkpoint shares it. Clips are encoded
alone (never packed with other clips: the tower masks keys past a clip's length, so a packed
neighbour or a different position would change what the model sees at inference), on the first
frames of their 30 s feature window only: the features past a clip's length are padding that the
masked encoder ignores, so a window cut to a multiple of ENCODE_STEP frames above the clip's
length gives the same valid outputs as the full window (tests/test_train.py checks it) at a
fraction of the cost. The cache is written in chunks (`chunk-<hash>.npy` + `.json`), each
published by rename, so a killed run loses at most the chunk in flight.

Examples. An item is `prompt` (default: the ASR prompt) with its audio placeholder expanded as the
processor does, then `target` + the end token: the loss is on the target tokens and the end token.

Batch order. A pure function of (seed, step): epoch e shuffles the examples with seed (seed, e),
cuts them into chunks of `sort_window` examples sorted by length (less padding), batches each
chunk and shuffles the batches; so a resumed run sees exactly the batches an unbroken run would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path

import jax
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from affjax.data.audio import load_audio
from affjax.runtime import shapes

ENCODE_STEP = 400   # feature frames (4 s): the encoder's window is cut to a multiple of this
ENCODE_BATCH = 8
CHUNK = 512         # clips per cache chunk


@dataclasses.dataclass
class Example:
    id: str
    ids: np.ndarray      # Int32['n'] prompt (audio placeholders expanded) + target + end
    n_prompt: int


def out_frames(cfg, feature_length: int) -> int:
    return int(cfg.audio.output_lengths(np.asarray(feature_length)))


def tower_fingerprint(model) -> str:
    """A digest of the audio tower's weights (the cache key)."""
    h = hashlib.sha256()
    for path, x in jax.tree_util.tree_leaves_with_path(nnx.to_pure_dict(nnx.state(model.audio_tower))):
        a = np.asarray(x, np.float32)
        h.update(jax.tree_util.keystr(path).encode())
        h.update(a.tobytes())
    return h.hexdigest()[:16]


class EncoderCache:
    """Per-clip audio-tower outputs on disk (float16 ['n_frames D'])."""

    def __init__(self, root: str | Path, model, feature_extractor):
        self.model, self.fe = model, feature_extractor
        self.dir = Path(root) / tower_fingerprint(model)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.index: dict[str, tuple[int, int, int]] = {}   # id -> (chunk number, start, n)
        self.chunks: list[Path] = []
        for meta in sorted(self.dir.glob("chunk-*.json")):
            self._add_chunk(meta)
        self._arrays: dict[int, np.ndarray] = {}
        self._encode = {}

    def _add_chunk(self, meta: Path) -> None:
        k = len(self.chunks)
        self.chunks.append(meta.with_suffix(".npy"))
        for cid, start, n in json.loads(meta.read_text())["clips"]:
            self.index[cid] = (k, start, n)

    def frames(self, cid: str) -> np.ndarray:
        k, start, n = self.index[cid]
        if k not in self._arrays:
            self._arrays[k] = np.load(self.chunks[k], mmap_mode="r")
        return self._arrays[k][start:start + n]

    def _tower(self, frames: int):
        """The jitted tower for a window of `frames` feature frames (one compile per window size)."""
        if frames not in self._encode:
            graphdef, state = nnx.split(self.model.audio_tower)
            self._encode[frames] = (jax.jit(lambda s, f, n: nnx.merge(graphdef, s)(f, n)), state)
        return self._encode[frames]

    def features(self, wave: np.ndarray) -> tuple[np.ndarray, int]:
        fe = self.fe
        out = fe(wave, sampling_rate=fe.sampling_rate, return_attention_mask=True, padding="max_length",
                 return_tensors="np")
        return out["input_features"][0].astype(np.float32), int(out["attention_mask"][0].sum())

    def ensure(self, items: list[dict], *, progress: bool = True, log=print) -> dict[str, str]:
        """Encode the items (`id`, `audio` path) not cached yet; returns {id: error} of those that failed."""
        todo = [it for it in items if it["id"] not in self.index]
        errors: dict[str, str] = {}
        if not todo:
            return errors
        log(f"encoder cache {self.dir}: encoding {len(todo)} of {len(items)} clips")
        bar = tqdm(total=len(todo), desc="encode", unit="clip", disable=not progress)
        for c0 in range(0, len(todo), CHUNK):
            part = todo[c0:c0 + CHUNK]
            outs: dict[str, np.ndarray] = {}
            feats = []
            for it in part:
                try:
                    wave = load_audio(it["audio"])
                    if len(wave) > 30 * self.fe.sampling_rate:
                        raise ValueError(f"{len(wave) / self.fe.sampling_rate:.1f} s: training takes clips of at "
                                         "most 30 s (one encoder window)")
                    f, n = self.features(wave)
                    if out_frames(self.model.cfg, n) < 1:
                        raise ValueError("clip too short: it gives no audio token (the encoder needs more than 20 ms)")
                    feats.append((it["id"], f, n))
                except (OSError, ValueError) as e:
                    errors[it["id"]] = str(e)
                    bar.update(1)
            # group by window size, then run batches of ENCODE_BATCH
            by_win: dict[int, list] = {}
            for cid, f, n in feats:
                win = min(f.shape[-1], -(-(n + 8) // ENCODE_STEP) * ENCODE_STEP)
                by_win.setdefault(win, []).append((cid, f, n))
            for win, group in sorted(by_win.items()):
                fn, state = self._tower(win)
                for b0 in range(0, len(group), ENCODE_BATCH):
                    g = group[b0:b0 + ENCODE_BATCH]
                    f = np.zeros((ENCODE_BATCH, g[0][1].shape[0], win), np.float32)
                    n = np.ones((ENCODE_BATCH,), np.int32)
                    for r, (_, fr, nr) in enumerate(g):
                        f[r], n[r] = fr[:, :win], nr
                    y = np.asarray(fn(state, f, n))
                    for r, (cid, _, nr) in enumerate(g):
                        outs[cid] = y[r, :out_frames(self.model.cfg, nr)].astype(np.float16)
                    bar.update(len(g))
            if outs:
                self._write_chunk(outs)
        bar.close()
        return errors

    def _write_chunk(self, outs: dict[str, np.ndarray]) -> None:
        ids = list(outs)
        name = "chunk-" + hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]
        flat = np.concatenate([outs[c] for c in ids])
        starts = np.cumsum([0] + [len(outs[c]) for c in ids])[:-1]
        tmp = self.dir / f".{name}.{os.getpid()}"
        np.save(f"{tmp}.npy", flat)
        Path(f"{tmp}.json").write_text(json.dumps({"clips": [[c, int(s), len(outs[c])] for c, s in zip(ids, starts)]}))
        os.replace(f"{tmp}.npy", self.dir / f"{name}.npy")  # the array first: a chunk counts once its json exists
        os.replace(f"{tmp}.json", self.dir / f"{name}.json")
        self._add_chunk(self.dir / f"{name}.json")


def build_examples(items: list[dict], cache: EncoderCache, tokenizer, *, audio_token_id: int,
                   default_prompt: str, end_token: str, audio_token: str = "<|AUDIO|>") -> list[Example]:
    """Token ids of each cached item: its prompt with the audio token repeated once per frame, the
    target and the end token."""
    out = []
    end = tokenizer.convert_tokens_to_ids(end_token)
    for it in items:
        if it["id"] not in cache.index:
            continue
        n = cache.index[it["id"]][2]
        prompt = it.get("prompt") or default_prompt
        if prompt.count(audio_token) != 1:
            raise ValueError(f"item {it['id']}: the prompt must hold one {audio_token!r}")
        p = np.asarray(tokenizer(prompt.replace(audio_token, audio_token * n), add_special_tokens=False)["input_ids"],
                       np.int32)
        t = np.asarray(tokenizer(it["target"], add_special_tokens=False)["input_ids"] + [end], np.int32)
        if int((p == audio_token_id).sum()) != n:
            raise ValueError(f"item {it['id']}: the prompt tokenizes to {(p == audio_token_id).sum()} audio tokens, "
                             f"expected {n}")
        out.append(Example(it["id"], np.concatenate([p, t]), len(p)))
    return out


def batch_order(n_examples: int, lengths: np.ndarray, *, batch_size: int, seed: int, epoch: int,
                sort_window: int = 256) -> list[np.ndarray]:
    """The batches of one epoch (example indices), a pure function of its arguments. Every batch
    is full: the epoch's last incomplete batch is dropped (its examples come first next epoch's shuffle)."""
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n_examples)
    batches = []
    for c0 in range(0, n_examples - batch_size + 1, sort_window):
        chunk = perm[c0:c0 + sort_window]
        chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk) - batch_size + 1, batch_size)]
    return [batches[i] for i in rng.permutation(len(batches))]


@dataclasses.dataclass
class TrainBatch:
    ids: np.ndarray        # Int32['B T'] prompt + target (+ end)
    valid: np.ndarray      # Bool['B T']
    span: np.ndarray       # Int32['B T'] 1 on audio tokens
    audio: np.ndarray      # Float32['B T D'] cached tower outputs at the audio tokens, zeros elsewhere
    n_prompt: np.ndarray   # Int32['B']
    cont_ids: np.ndarray   # Int32['B K'] target + end
    cont_valid: np.ndarray  # Bool['B K']


def collate(examples: list[Example], cache: EncoderCache, *, audio_token_id: int, d: int) -> TrainBatch:
    B = len(examples)
    T = shapes.bucket(max(len(e.ids) for e in examples), shapes.TRAIN_BUCKETS, "training sequence")
    ids = np.zeros((B, T), np.int32)
    valid = np.zeros((B, T), bool)
    span = np.zeros((B, T), np.int32)
    audio = np.zeros((B, T, d), np.float32)
    n_prompt = np.zeros((B,), np.int32)
    for b, e in enumerate(examples):
        n = len(e.ids)
        ids[b, :n], valid[b, :n], n_prompt[b] = e.ids, True, e.n_prompt
        where = np.flatnonzero(e.ids == audio_token_id)
        span[b, where] = 1
        audio[b, where] = cache.frames(e.id)
    cont_ids, cont_valid = shapes.pad_continuations([e.ids[e.n_prompt:] for e in examples], B)
    return TrainBatch(ids, valid, span, audio, n_prompt, cont_ids, cont_valid)
