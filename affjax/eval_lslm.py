"""`affjax eval` for Qwen2-Audio checkpoints: tasks `asr` (WER / CER), `qa` (accuracy) and `st`
(BLEU), with Affinity Pooling, resumable results and two-pass scheduling.

    affjax eval --ckpt CKPT --task asr|qa|st --manifest M.jsonl --out RUN_DIR [--pooling SPEC]
    affjax eval --ckpt CKPT --task asr --data hf:openslr/librispeech_asr:clean:test --out RUN_DIR

Items (the manifest schema is in docs/manifests.md). asr and st generate greedily; qa with
`choices` scores each choice as a continuation of the prompt (log-likelihood, jitted and batched)
and predicts the best one; qa without choices generates and is scored by normalised exact match.
A prompt comes from the item or the task's default (affjax.metrics.default_prompt). Audio longer
than 30 s is split into 30 s windows, each its own clip, placed as consecutive audio spans
(affjax.models.qwen2_audio.inputs.window_prompt).

Results. Each finished item is appended to `RUN_DIR/results.jsonl` and the file is flushed and
fsynced after every language-model batch, so a kill loses nothing already written. Running the
same command again resumes: items whose id is already there are skipped (error rows too, unless
`--retry-errors`); a torn last line is dropped. At the end the file is rewritten once, atomically,
in manifest order with one row per id. `RUN_DIR/run.json` holds the settings that change results;
resuming with different ones is refused. `summary.json` and `summary.md` are computed from the
whole results file (metrics, retention, FLOPs) plus this invocation's throughput, compile time,
padding fraction, versions and command line.

Scheduling. `two-pass` (default, bucketed pooling): the items of each window (`--window` items)
are first encoded (audio encoder, projector, embeddings and the input stage), shortest first; the
encoded rows wait on the host; then the language model runs on batches of rows sorted by their
pooled length, so rows of one batch need the same bucket and padding stays small. A
multiple-choice item is encoded once and its choices are appended to the stored row.
`in-order`: batches in manifest order, each run whole (as `affjax score/generate`); fixed-capacity
mode always runs this way (one compiled prefill). The padding fraction is the share of the
language model's first buffer (rows x bucket, after the input stage) that holds no token.
"""

from __future__ import annotations

import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

from affjax import shapes, sharding

__all__ = ["ResultStore", "run_lslm_eval", "format_lslm_summary", "SCHEDULES"]

SCHEDULES = ("two-pass", "in-order")
TASKS = ("asr", "qa", "st")
# settings that change results: resuming a run dir with other values is refused
_RUN_KEYS = ("task", "ckpt", "data", "pooling", "positions", "proportional", "pool_mode", "capacity",
             "max_new_tokens", "dtype")


# ----------------------------------------------------------------------------------------------
# the results file


class ResultStore:
    """`results.jsonl` of a run directory: rows appended and fsynced per batch, read back on resume.

    Reading keeps the last row of each id; a line that does not parse (a torn write from a kill) is
    dropped and the file truncated before it, so appends start on a clean line."""

    def __init__(self, path: Path, log=print):
        self.path = Path(path)
        self.rows: dict[str, dict] = {}
        if self.path.exists():
            data = self.path.read_bytes()
            good_end = 0
            for line in data.splitlines(keepends=True):
                try:
                    if not line.endswith(b"\n"):
                        raise ValueError("no end of line")
                    rec = json.loads(line)
                    self.rows[str(rec["id"])] = rec
                except (ValueError, KeyError, TypeError):
                    log(f"{self.path}: dropping a torn or unreadable line at byte {good_end}")
                    break
                good_end += len(line)
            if good_end < len(data):
                with open(self.path, "r+b") as f:
                    f.truncate(good_end)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def done(self, retry_errors: bool = False) -> set[str]:
        return {k for k, r in self.rows.items() if not (retry_errors and "error" in r)}

    def add(self, rec: dict) -> None:
        self._f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        self.rows[str(rec["id"])] = rec

    def flush(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())

    def compact(self, order: list[str]) -> None:
        """Rewrite the file in `order` (ids not in it last), one row per id, atomically."""
        self.flush()
        self._f.close()
        rank = {k: i for i, k in enumerate(order)}
        tmp = self.path.with_suffix(".jsonl.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for k in sorted(self.rows, key=lambda k: rank.get(k, len(rank))):
                f.write(json.dumps(self.rows[k], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def close(self) -> None:
        self._f.close()


# ----------------------------------------------------------------------------------------------
# items


@dataclasses.dataclass
class _Item:
    row: object                      # ManifestRow
    enc: object                      # inputs.Encoded, the prompt only
    record: dict                     # the result row's fields known before running
    conts: list | None = None        # qa multiple choice: token ids of each choice
    front: dict | None = None        # two-pass: the encoded row, on the host
    outputs: dict = dataclasses.field(default_factory=dict)  # unit key -> output


@dataclasses.dataclass
class _Unit:
    """One language-model sequence: an item, plus one choice for multiple-choice scoring."""
    item: _Item
    choice: int | None

    @property
    def cont(self):
        return None if self.choice is None else self.item.conts[self.choice]

    def length(self) -> int:
        n = self.item.front["n"] if self.item.front is not None else len(self.item.enc.ids)
        return n + (0 if self.cont is None else len(self.cont))


def _answer_index(item: dict, choices: list[str]) -> int | None:
    a = item.get("answer")
    if isinstance(a, bool):
        raise ValueError("'answer' must be a choice index or the choice text")
    if isinstance(a, int):
        if not 0 <= a < len(choices):
            raise ValueError(f"'answer' index {a} outside the {len(choices)} choices")
        return a
    if isinstance(a, str):
        if a not in choices:
            raise ValueError(f"'answer' {a!r} is not one of the choices")
        return choices.index(a)
    raise ValueError("multiple-choice item needs 'answer' (a choice index or the choice text)")


def _prepare(row, processor, task: str) -> _Item:
    """Manifest row -> _Item, or raise ValueError/AudioError naming the cause."""
    from affjax import metrics
    from affjax.data.audio import load_audio
    from affjax.models.qwen2_audio.inputs import encode, window_prompt

    it = row.item
    if it.get("error"):  # a recipe's bad row (affjax.recipes)
        raise ValueError(str(it["error"]))
    if not it.get("audio"):
        raise ValueError("missing required field: audio")
    rec = {"id": row.id, "task": task}
    for k in ("reference", "language", "source_lang", "target_lang", "choices", "answer"):
        if k in it:
            rec[k] = it[k]
    if "reference" in it and not isinstance(it["reference"], str):
        raise ValueError("field 'reference' must be a string")
    prompt = it.get("prompt")
    if prompt is None:
        prompt = metrics.default_prompt(task, language=it.get("language") or "en",
                                        source_lang=it.get("source_lang"), target_lang=it.get("target_lang"))
    if not isinstance(prompt, str) or not prompt:
        raise ValueError("'prompt' must be a non-empty string")
    conts = None
    if task == "qa":
        choices = it.get("choices")
        if choices is not None:
            if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
                raise ValueError("'choices' must be a list of at least two non-empty strings")
            rec["answer_index"] = _answer_index(it, choices)
            conts = []
            for c in choices:
                # a choice continues the prompt's text: one space between them unless either side has it
                # (as lm-evaluation-harness does), so "...is:" + "B" is scored as "...is: B"
                text = c if c[:1].isspace() or prompt[-1:].isspace() else " " + c
                ids = np.asarray(processor.tokenizer(text, add_special_tokens=False)["input_ids"], np.int32)
                if ids.size == 0:
                    raise ValueError(f"choice {c!r} tokenizes to zero tokens")
                conts.append(ids)
        elif not isinstance(it.get("answer"), (str, list)):
            raise ValueError("qa item needs 'choices' + 'answer', or an open 'answer' (a string or a list of them)")
    sr = processor.feature_extractor.sampling_rate
    paths = it["audio"] if isinstance(it["audio"], list) else [it["audio"]]
    waves = [load_audio(p, sr=sr) for p in paths]
    rec["audio_seconds"] = round(sum(len(w) for w in waves) / sr, 3)
    prompt, clips = window_prompt(processor, prompt, waves, sr)
    rec["windows"] = len(clips)
    try:
        enc = encode(processor, prompt, clips, None)
    except (ValueError, TypeError) as e:
        raise ValueError(f"processor rejected the item: {e}") from None
    longest = len(enc.ids) + max((len(c) for c in conts), default=0) if conts else len(enc.ids)
    shapes.bucket(longest)  # too long for any bucket: an error row, not a crash
    return _Item(row, enc, rec, conts)


# ----------------------------------------------------------------------------------------------
# the runner


@dataclasses.dataclass
class _Acc:
    """This invocation's counters."""
    lm_tokens: int = 0
    lm_slots: int = 0
    compile_seconds: float = 0.0
    run_seconds: float = 0.0
    items_done: int = 0
    steady_seconds: float = 0.0
    steady_units: int = 0
    units: int = 0


class _Runner:
    def __init__(self, engine, processor, cfg, task: str, store: ResultStore, bar, bs: int, log=print):
        from affjax.engine import TRACES
        self.engine, self.processor, self.cfg, self.task, self.bs = engine, processor, cfg, task, bs
        self.store, self.bar, self.log = store, bar, log
        self.traces = TRACES
        self.acc = _Acc()
        self.audio_id = engine.cfg.audio_token_id
        self.out_frames = engine.cfg.audio.output_lengths
        self.n_stages = len(engine.pooling.stages)
        self.front_stages = 1 if engine.pooling.stages and engine.pooling.stages[0].layer == 0 else 0
        self.max_new = cfg.max_new_tokens
        self.multi = sharding.process_count() > 1

    # -- timing ------------------------------------------------------------------------------------
    def _timed(self, fn, units: int):
        before = sum(self.traces.values())
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        self.acc.run_seconds += dt
        if sum(self.traces.values()) > before:
            self.acc.compile_seconds += dt
        else:
            self.acc.steady_seconds += dt
            self.acc.steady_units += units
        self.acc.units += units
        return out

    # -- windows -------------------------------------------------------------------------------------
    def run_window(self, items: list[_Item], two_pass: bool) -> None:
        if two_pass:
            self._encode_pass(items)
        units = []
        for it in items:
            units += [_Unit(it, k) for k in range(len(it.conts))] if it.conts else [_Unit(it, None)]
        if two_pass:
            units.sort(key=lambda u: u.length())
        # generation first, then scoring: on several processes each engine call is collective, so
        # every process runs the same number of batches of each kind (empty ones when it has none)
        for score in (False, True):
            mine = [u for u in units if (u.cont is not None) == score]
            n = -(-len(mine) // self.bs)
            total = int(sharding.agree_max([n])[0]) if self.multi else n
            for i in range(total):
                batch = mine[i * self.bs:(i + 1) * self.bs]
                if not batch:
                    self._empty(score)
                    continue
                outs = (self._lm_stored if two_pass else self._lm_whole)(batch)
                for u, o in zip(batch, outs):
                    u.item.outputs[u.choice] = o
                    if len(u.item.outputs) == (len(u.item.conts) if u.item.conts else 1):
                        self._finish(u.item)
                self.store.flush()

    def _empty(self, score: bool) -> None:
        fe = self.processor.feature_extractor
        b = sharding.empty_batch(self.bs, n_mels=fe.feature_size, frames=fe.nb_max_frames, score=score,
                                 pad_id=self.engine.pad_id)
        self._run_whole(b, score)  # the very same engine calls (and collective reads) as a real batch

    def _run_whole(self, batch, score: bool):
        eng = self.engine
        out = eng.prefill(batch, extra=0 if score else self.max_new, score=score)
        stats = eng._local(out.stats)
        if score:
            return np.asarray(eng._local(out.logprobs), np.float64).sum(1), stats
        return eng.decode(out, batch.rows, self.max_new), stats

    def _encode_pass(self, items: list[_Item]) -> None:
        """Pass 1: encoder, embeddings and input stage for every item, shortest first; each row is
        kept on the host (its valid prefix only)."""

        from affjax.models.qwen2_audio.inputs import collate
        order = sorted(items, key=lambda it: len(it.enc.ids))
        bs = self.bs
        for i in range(0, len(order), bs):
            chunk = order[i:i + bs]
            batch = collate([it.enc for it in chunk], batch_size=bs, audio_token_id=self.audio_id,
                            out_frames_of=self.out_frames, pad_id=self.engine.pad_id)

            def run():
                return self.engine._local(self.engine.front(batch))
            seq, stats = self._timed(run, 0)
            for b, it in enumerate(chunk):
                n = int(seq.valid[b].sum())
                npr = len(it.enc.ids)
                it.front = {"n": n, "n_prompt": npr, "x": seq.x[b, :n], "pos": seq.pos[b, :n],
                            "size": seq.size[b, :n], "span": seq.span[b, :n], "slot_of": seq.slot_of[b, :npr],
                            "audio": [int((batch.span[b] > 0).sum())] + [int(s["audio_out"][b]) for s in stats],
                            "lm": [npr] + [int(s["n_valid"][b]) for s in stats]}

    def _lm_stored(self, units: list[_Unit]) -> list[dict]:
        """Pass 2: the rest of the prefill (and decoding) for stored rows, with choices appended."""

        from affjax.engine import Seq, _embed_tokens
        eng, bs = self.engine, self.bs
        score = units[0].cont is not None
        lens = [u.length() for u in units]
        T = shapes.bucket(max(lens))
        T0 = shapes.bucket(max(u.item.front["n_prompt"] + (0 if u.cont is None else len(u.cont)) for u in units))
        d = units[0].item.front["x"].shape[-1]
        x = np.zeros((bs, T, d), units[0].item.front["x"].dtype)
        valid = np.zeros((bs, T), bool)
        pos = np.zeros((bs, T), np.float32)
        size = np.ones((bs, T), np.float32)
        span = np.zeros((bs, T), np.int32)
        slot_of = np.full((bs, T0), -1, np.int32)
        n_prompt = np.zeros((bs,), np.int32)
        for b, u in enumerate(units):
            f = u.item.front
            n = f["n"]
            x[b, :n], pos[b, :n], size[b, :n], span[b, :n] = f["x"], f["pos"], f["size"], f["span"]
            valid[b, :n] = True
            slot_of[b, :f["n_prompt"]] = f["slot_of"]
            n_prompt[b] = f["n_prompt"]
        cont_ids = cont_valid = None
        if score:
            K = shapes.bucket(max(len(u.cont) for u in units), shapes.CONT_BUCKETS, "continuation")
            cont_ids = np.zeros((bs, K), np.int32)
            cont_valid = np.zeros((bs, K), bool)
            for b, u in enumerate(units):
                cont_ids[b, :len(u.cont)] = u.cont
                cont_valid[b, :len(u.cont)] = True
            emb = np.asarray(eng._local(eng._fn("embed_tokens", _embed_tokens)(eng.state, eng._put(cont_ids))))
            for b, u in enumerate(units):
                f, k = u.item.front, len(u.cont)
                n, npr = f["n"], f["n_prompt"]
                x[b, n:n + k] = emb[b, :k]
                valid[b, n:n + k] = True
                # a continuation token is text: original position under first/mean, its slot under reindex
                pos[b, n:n + k] = (n if eng.pooling.positions == "reindex" else npr) + np.arange(k)
                slot_of[b, npr:npr + k] = n + np.arange(k)
        self.acc.lm_tokens += int(valid.sum())
        self.acc.lm_slots += bs * T
        seq = Seq(*map(eng._put, (x, valid, pos, size, span, slot_of)))
        pre = [None] * self.front_stages

        def run():
            out = eng.prefill_rest(seq, n_prompt, pre, extra=0 if score else self.max_new, score=score,
                                   cont_ids=cont_ids, cont_valid=cont_valid)
            later = eng._local(out.stats[self.front_stages:])
            if score:
                return np.asarray(eng._local(out.logprobs), np.float64).sum(1), later
            return eng.decode(out, len(units), self.max_new), later
        res, later = self._timed(run, len(units))
        outs = []
        for b, u in enumerate(units):
            f = u.item.front
            k = 0 if u.cont is None else len(u.cont)  # the front ran without the continuation
            o = {"audio": f["audio"] + [int(s["audio_out"][b]) for s in later],
                 "lm": [v + k for v in f["lm"]] + [int(s["n_valid"][b]) for s in later]}
            o["logprob" if score else "tokens"] = float(res[b]) if score else res[b]
            outs.append(o)
        return outs

    def _lm_whole(self, units: list[_Unit]) -> list[dict]:
        """In-order scheduling (and fixed-capacity mode): each batch runs whole, as `affjax score`."""

        from affjax.models.qwen2_audio.inputs import collate
        eng, bs = self.engine, self.bs
        score = units[0].cont is not None
        encs = [dataclasses.replace(u.item.enc, cont_ids=u.cont) for u in units]
        batch = collate(encs, batch_size=bs, audio_token_id=self.audio_id, out_frames_of=self.out_frames,
                        pad_id=eng.pad_id)

        res, stats = self._timed(lambda: self._run_whole(batch, score), len(units))
        first = [int(s["n_valid"][b]) for s in stats[:self.front_stages] for b in range(len(units))]
        n_first = first if first else [int(batch.valid[b].sum()) for b in range(len(units))]
        T = shapes.bucket(max(max(n_first), 1)) if first else batch.ids.shape[1]
        self.acc.lm_tokens += int(sum(n_first))
        self.acc.lm_slots += bs * min(T, batch.ids.shape[1])
        outs = []
        for b, u in enumerate(units):
            o = {"audio": [int((batch.span[b] > 0).sum())] + [int(s["audio_out"][b]) for s in stats],
                 "lm": [int(batch.valid[b].sum())] + [int(s["n_valid"][b]) for s in stats]}
            if eng.pool_mode == "fixed" and stats:
                o["forced"] = [int(s["forced"][b]) for s in stats]
            o["logprob" if score else "tokens"] = float(res[b]) if score else res[b]
            outs.append(o)
        return outs

    # -- results ---------------------------------------------------------------------------------------
    def _finish(self, it: _Item) -> None:
        rec = dict(it.record)
        outs = [it.outputs[k] for k in sorted(it.outputs, key=lambda k: -1 if k is None else k)]
        if it.conts:
            lps = [o["logprob"] for o in outs]
            rec["choice_logprobs"] = lps
            rec["pred"] = int(np.argmax(lps))
            rec["correct"] = rec["pred"] == rec["answer_index"]
        else:
            toks = outs[0]["tokens"]
            rec["tokens"] = toks
            rec["text"] = self.processor.tokenizer.decode(toks, skip_special_tokens=True).strip()
            if self.task == "qa":
                rec["pred"] = rec["text"]
        rec["audio_tokens"] = outs[0]["audio"]
        rec["lm_tokens"] = [o["lm"] for o in outs]  # per sequence run: valid tokens unpooled, after each stage
        if "forced" in outs[0]:
            rec["forced_merges"] = outs[0]["forced"]
        self.store.add(rec)
        self.acc.items_done += 1
        self.bar.update(1)

    def error(self, row, cause: str) -> None:
        self.store.add({"id": row.id, "error": cause})
        self.acc.items_done += 1
        self.bar.update(1)


def _versions() -> dict:
    import importlib.metadata as md
    out = {}
    for pkg in ("affjax", "jax", "jaxlib", "flax", "orbax-checkpoint", "transformers", "numpy"):
        try:
            out[pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out[pkg] = None
    return out


def _check_run_dir(out: Path, settings: dict) -> None:
    path = out / "run.json"
    if path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if isinstance(old, dict):
            diff = {k: (old.get(k), settings.get(k)) for k in _RUN_KEYS if old.get(k) != settings.get(k)}
            if diff:
                raise ValueError(f"{out} holds a run with other settings ({', '.join(f'{k}: {a!r} -> {b!r}' for k, (a, b) in diff.items())}); "
                                 "use another --out to start a new run")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(settings, indent=1) + "\n")


def _rows(cfg, out: Path, log):
    """(manifest rows, task, data label) from --manifest or --data hf:..."""
    from affjax.data.manifest import read_manifest
    if cfg.data and cfg.data.startswith("hf:"):
        from affjax import recipes
        data_dir = out / "data"
        manifest = data_dir / "manifest.jsonl"
        recipe = data_dir / "recipe.json"  # written by recipes.load, last: the data set is complete
        if manifest.is_file() and recipe.is_file() and json.loads(recipe.read_text()).get("spec") == cfg.data:
            task = json.loads(recipe.read_text())["task"]
        else:
            log(f"building the manifest from {cfg.data} -> {data_dir}")
            _, task = recipes.load(cfg.data, data_dir, limit=cfg.limit, progress=cfg.progress)
        if cfg.task_given and cfg.task != task:
            raise ValueError(f"--data {cfg.data} is a {task} data set, but --task {cfg.task} was given")
        # a recipe's bad row carries its own `error` (and no audio): _prepare reports that cause
        return read_manifest(manifest, required=("id",)), task, cfg.data
    if cfg.manifest is None:
        raise ValueError("Qwen2-Audio eval needs --manifest or --data hf:DATASET[:CONFIG]:SPLIT")
    rows = read_manifest(cfg.manifest, required=("id", "audio"))
    if cfg.limit:
        rows = rows[:cfg.limit]
    return rows, cfg.task, Path(cfg.manifest).stem


def run_lslm_eval(cfg, ckpt: Path, labels: dict, log=print) -> dict:
    """Run (or resume) an eval of a Qwen2-Audio checkpoint; returns the summary."""
    from tqdm import tqdm

    from affjax.engine import TRACES, Engine
    from affjax.jobs import load_for_inference
    from affjax.pooling.spec import parse_pooling

    t_start = time.perf_counter()
    sharding.initialize_distributed()  # first: a no-op unless launched as several processes
    mesh = sharding.mesh_or_none(cfg.mesh)
    multi = sharding.process_count() > 1
    out = Path(cfg.out or Path("runs") / f"{labels['model']}-{labels['data']}-{cfg.task}")
    out.mkdir(parents=True, exist_ok=True)
    if cfg.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {cfg.schedule!r} ({', '.join(SCHEDULES)})")
    rows, task, data_label = _rows(cfg, out, log)
    seen = set()
    for r in rows:  # a duplicate id's error row must not replace the first item's result
        if r.id in seen:
            r.id = f"{r.id}@line{r.index}"
        seen.add(r.id)
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r} ({', '.join(TASKS)})")
    model, mcfg, processor, eos_ids, pad_id = load_for_inference(str(ckpt), cfg.dtype, mesh)
    pooling = parse_pooling(cfg.pooling, mcfg.text.layers, positions=cfg.positions, proportional=cfg.proportional)
    engine = Engine(model, pooling=pooling, pool_mode=cfg.pool_mode, capacity=cfg.capacity, eos_ids=eos_ids,
                    pad_id=pad_id, mesh=mesh)
    bs = sharding.padded_batch_size(cfg.batch_size, mesh)  # whole rows of the data axis
    settings = {"task": task, "ckpt": str(Path(ckpt).resolve()), "data": cfg.data or str(Path(cfg.manifest).resolve()),
                "pooling": pooling.to_text() if pooling.stages else "none", "positions": pooling.positions,
                "proportional": bool(pooling.proportional), "pool_mode": cfg.pool_mode,
                "capacity": cfg.capacity if cfg.pool_mode == "fixed" else None,
                "max_new_tokens": cfg.max_new_tokens, "dtype": cfg.dtype}
    _check_run_dir(out, settings)
    t_load = time.perf_counter() - t_start

    # several processes: each runs its share into its own file; process 0 merges them at the end
    all_rows = rows
    rows = sharding.host_share(rows)
    name = f"results.p{sharding.process_index()}.jsonl" if multi else "results.jsonl"
    store = ResultStore(out / name, log=log)
    done = store.done(cfg.retry_errors)
    todo = [r for r in rows if r.id not in done]
    if len(todo) < len(rows):
        log(f"resuming {out}: {len(rows) - len(todo)} of {len(rows)} items already done")
    # the stored-row path's engine calls depend on each process's rows: one process only
    two_pass = cfg.schedule == "two-pass" and not (cfg.pool_mode == "fixed" and pooling.stages) and not multi
    traces0 = dict(TRACES)
    bar = tqdm(total=len(rows), initial=len(rows) - len(todo), unit="item", disable=not cfg.progress,
               desc=f"{task} {settings['pooling']}", dynamic_ncols=True)
    runner = _Runner(engine, processor, cfg, task, store, bar, bs, log)
    n_windows = -(-len(todo) // cfg.window)
    if multi:
        n_windows = int(sharding.agree_max([n_windows])[0])
    try:
        for w in range(0, n_windows * cfg.window, cfg.window):
            items = []
            for row in todo[w:w + cfg.window]:
                if row.error is not None:
                    runner.error(row, row.error)
                    continue
                try:
                    items.append(_prepare(row, processor, task))
                except Exception as e:  # noqa: BLE001 - one bad item never stops the run
                    runner.error(row, f"{type(e).__name__}: {e}")
            store.flush()
            if items or multi:
                runner.run_window(items, two_pass)
            bar.set_postfix(compile=f"{runner.acc.compile_seconds:.1f}s", refresh=False)
        store.compact([r.id for r in rows])
    finally:
        bar.close()
        store.close()
    if multi:
        every = sharding.gather_to_host0(list(store.rows.values()))
        if every is None:
            return {"task": task, "process": sharding.process_index(), "written_by": 0, "out": str(out)}
        merged = ResultStore(out / "results.jsonl", log=log)
        for rec in every:
            merged.add(rec)
        merged.compact([r.id for r in all_rows])
        merged.close()
        store = merged
    rows = all_rows

    acc = runner.acc
    compiles = {k: v - traces0.get(k, 0) for k, v in TRACES.items() if v - traces0.get(k, 0)}
    invocation = {
        "items_this_run": acc.items_done, "load_seconds": round(t_load, 3),
        "run_seconds": round(acc.run_seconds, 3), "compile_seconds": round(acc.compile_seconds, 3),
        "items_per_second": round(acc.items_done / acc.run_seconds, 3) if acc.run_seconds else None,
        "steady_sequences_per_second": (round(acc.steady_units / acc.steady_seconds, 3)
                                        if acc.steady_seconds else None),
        "padding_fraction": round(1 - acc.lm_tokens / acc.lm_slots, 4) if acc.lm_slots else None,
        "compiles": compiles,
        "total_seconds": round(time.perf_counter() - t_start, 3),
    }
    summary = summarize([store.rows[r.id] for r in rows if r.id in store.rows], task, mcfg.text, pooling)
    summary.update({"model": labels["model"], "data": data_label, "schedule": "two-pass" if two_pass else "in-order",
                    "batch_size": bs, "items": len(rows), **invocation,
                    "mesh": sharding.mesh_text(mesh) if mesh is not None else "one device",
                    "processes": sharding.process_count(),
                    "versions": _versions(), "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:])})
    summary.update({k: settings[k] for k in ("pooling", "positions", "proportional", "pool_mode", "capacity")})
    (out / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary) + "\n")
    summary["out"] = str(out)
    return summary


def summarize(results: list[dict], task: str, text_cfg, pooling) -> dict:
    """Metrics, error counts, retention and analytic FLOPs from result rows (old and new alike)."""
    from affjax import metrics
    from affjax.jobs import _flops_summary
    ok = [r for r in results if "error" not in r]
    errs = [r for r in results if "error" in r]
    causes: dict[str, int] = {}
    for r in errs:
        kind = r["error"].split(":", 1)[0] if ":" in r["error"] else "error"
        kind = "manifest" if kind.startswith("line ") else kind
        causes[kind] = causes.get(kind, 0) + 1
    m = metrics.task_metrics(task, ok)
    out = {"task": task, "ok": len(ok), "errors": len(errs), "error_kinds": causes, "metrics": m,
           "primary": list(metrics.primary(task, m))}
    if ok and pooling.stages:
        a = np.asarray([r["audio_tokens"] for r in ok], np.float64)
        base = np.maximum(a[:, :1], 1)
        out["retention_per_stage"] = [round(float((a[:, k:k + 1] / base).mean()), 4) for k in range(1, a.shape[1])]
        out["final_retention"] = round(float(a[:, -1].sum() / max(a[:, 0].sum(), 1)), 4)
        counts = [c for r in ok for c in r["lm_tokens"]]
        out.update(_flops_summary(text_cfg, pooling.stages, counts, None))
        if any("forced_merges" in r for r in ok):
            out["forced_merges"] = int(sum(sum(r.get("forced_merges", [])) for r in ok))
    elif ok:
        out["final_retention"] = 1.0
        out["lm_prefill_flops_ratio_analytic"] = 1.0
    return out


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_markdown(s: dict) -> str:
    name, val = s.get("primary") or (None, None)
    lines = [f"# {s['task']} eval: {s['model']} on {s['data']}", "",
             f"`{s['command']}`", "",
             "| | |", "|---|---|",
             f"| {name or 'metric'} | {_fmt(val)} |",
             f"| items | {s['items']} ({s['ok']} ok, {s['errors']} errors) |",
             f"| pooling | {s['pooling']}{' +proportional' if s.get('proportional') else ''} ({s['pool_mode']}) |",
             f"| retention per stage | {_fmt(s.get('retention_per_stage'))} |",
             f"| final retention | {_fmt(s.get('final_retention'))} |",
             f"| LM prefill FLOPs vs unpooled (analytic) | {_fmt(s.get('lm_prefill_flops_ratio_analytic'))} |",
             f"| schedule / batch size | {s['schedule']} / {s['batch_size']} |",
             f"| padding fraction (this run) | {_fmt(s.get('padding_fraction'))} |",
             f"| items/s (this run, incl. compile) | {_fmt(s.get('items_per_second'))} |",
             f"| compile / run seconds (this run) | {_fmt(s.get('compile_seconds'))} / {_fmt(s.get('run_seconds'))} |",
             ""]
    lines.append("Metrics: " + json.dumps(s.get("metrics", {})))
    if s.get("error_kinds"):
        lines.append("")
        lines.append("Errors by kind: " + json.dumps(s["error_kinds"]))
    lines.append("")
    lines.append("Versions: " + ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items()))
    return "\n".join(lines)


def format_lslm_summary(s: dict) -> str:
    name, val = s.get("primary") or (None, None)
    head = (f"{s['model']} on {s['data']} ({s['task']}): {s['items']} items, {s['ok']} ok, {s['errors']} errors; "
            f"{name} {_fmt(val)}")
    pool = (f"pooling {s['pooling']}{' +proportional' if s.get('proportional') else ''}: retention "
            f"{_fmt(s.get('final_retention'))}, LM prefill FLOPs {_fmt(s.get('lm_prefill_flops_ratio_analytic'))} of unpooled")
    speed = (f"{s['schedule']}: {_fmt(s.get('items_per_second'))} items/s, padding {_fmt(s.get('padding_fraction'))}, "
             f"compile {_fmt(s.get('compile_seconds'))} s of {_fmt(s.get('run_seconds'))} s; results in {s.get('out')}")
    return "\n".join([head, pool, speed])
