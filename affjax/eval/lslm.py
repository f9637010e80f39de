"""Jobs on Qwen2-Audio and Kimi-Audio checkpoints, through the one runner (affjax.eval.runner):
`score`, `generate` and `eval` tasks `asr` (WER / CER), `qa` (accuracy) and `st` (BLEU), with
Affinity Pooling. What differs between the two models (prompts, audio, batches, detokenizing) is
their frontend (affjax.eval.frontends); the rest is one code path.

    affjax score    --ckpt CKPT --manifest M.jsonl --out scores.jsonl
    affjax generate --ckpt CKPT --manifest M.jsonl --out gen.jsonl
    affjax eval     --ckpt CKPT --task asr|qa|st --manifest M.jsonl --out RUN_DIR [--pooling SPEC]
    affjax eval     --ckpt CKPT --task asr --data hf:openslr/librispeech_asr:clean:test --out RUN_DIR

Items (manifest fields per task: docs/manifests.md). `score` scores the item's `continuation`
after its `prompt`; `generate`, asr and st generate greedily; qa with `choices` scores each choice
as a continuation of the prompt and predicts the best; qa without choices generates and is scored
by normalised exact match. Audio longer than the feature window (30 s) is split into windows of it:
for Qwen2-Audio each its own clip, placed as consecutive audio spans
(affjax.models.qwen2_audio.inputs.window_prompt); for Kimi-Audio one audio span of the windows'
tokens (docs/kimi_audio.md); in every task.

Results go through affjax.eval.results: rows appended and fsynced per batch, a rerun resumes, a rerun
with other inputs or settings is refused (`--restart` starts over).

Scheduling. `two-pass` (eval's default, bucketed pooling): the items of each window are first
encoded (audio encoder, projector, embeddings and the input stage), shortest first; the encoded
rows wait on the host (`Engine.front_rows`); then the language model runs on batches of rows
sorted by pooled length (`Engine.pack_rows`, `Engine.run_packed`), so rows of one batch need the
same bucket. A multiple-choice item is encoded once and its choices are appended to the stored row.
`in-order` (score/generate's default; fixed-capacity mode and several processes always): batches
in manifest order, each run whole. The padding fraction is the share of the language model's first
buffer (rows x bucket, after the input stage) that holds no token.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import numpy as np

from affjax.data.audio import load_audio
from affjax.data.manifest import read_manifest
from affjax.eval import frontends, metrics, recipes, runner
from affjax.eval.frontends import load_for_inference
from affjax.eval.results import ResultStore, fingerprint_checkpoint, fingerprint_file, open_run
from affjax.eval.summary import command_line, flops_summary, retention_summary, versions, write_summary
from affjax.models.checkpoint import CONFIG_NAME, get_spec
from affjax.pooling.oracle import item_seed, parse_oracle
from affjax.pooling.spec import parse_pooling
from affjax.runtime import shapes, sharding
from affjax.runtime.costs import program_costs
from affjax.runtime.engine import Engine
from affjax.runtime.flops import lm_xla_flops

__all__ = ["TASKS", "load_for_inference", "run_lslm", "summarize", "summary_markdown", "format_lslm_summary"]

TASKS = ("score", "generate", "asr", "qa", "st")
_SCORED = ("score", "qa")  # tasks whose items may carry continuations


# ----------------------------------------------------------------------------------------------
# items


@dataclasses.dataclass
class _Item:
    id: str
    enc: object                      # inputs.Encoded, the prompt only
    record: dict                     # the result row's fields known before running
    audio_seconds: float
    conts: list | None = None        # score: [continuation ids]; qa multiple choice: ids of each choice
    front: object | None = None      # two-pass: engine.FrontRow, on the host
    outputs: dict = dataclasses.field(default_factory=dict)  # choice (None: generation) -> output
    failed: bool = False


@dataclasses.dataclass
class _Unit:
    """One language-model sequence: an item, plus one continuation when scoring."""
    item: _Item
    choice: int | None

    @property
    def cont(self):
        return None if self.choice is None else self.item.conts[self.choice]

    def length(self) -> int:
        n = len(self.item.front.x) if self.item.front is not None else len(self.item.enc.ids)
        return n + (0 if self.cont is None else len(self.cont))


def _answer_index(item: dict, choices: list[str]) -> int:
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


def _tokens(frontend, text: str, what: str) -> np.ndarray:
    ids = frontend.tokens(text)
    if ids.size == 0:
        raise ValueError(f"{what} tokenizes to zero tokens")
    return ids


class LslmTask:
    """score / generate / asr / qa / st on an engine and the model's frontend (affjax.eval.frontends),
    in affjax.eval.runner's task protocol."""

    def __init__(self, task: str, engine: Engine, frontend, cfg: runner.JobConfig, two_pass: bool, log=print,
                 words: dict | None = None):
        self.task, self.engine, self.frontend, self.cfg, self.log = task, engine, frontend, cfg, log
        self.two_pass = two_pass
        self.words = words  # oracle runs: item id -> [Word] (affjax.eval.alignment)
        self.bs = sharding.padded_batch_size(cfg.batch_size, engine.mesh)  # whole rows of the data axis
        self.front_stages = engine.front_stages
        self.multi = sharding.process_count() > 1
        self.clock: runner.Clock | None = None
        self.lm_tokens = self.lm_slots = 0
        self.xla = {"pooled": 0.0, "unpooled": 0.0}
        # XLA-measured FLOPs (score / generate, in order): compiles each batch shape's unpooled programs once more
        engine.record = bool(engine.pooling.stages) and cfg.xla_cost and not two_pass and task in ("score", "generate")

    # -- pass 0: one manifest row -> an item (raise: the item is an error row) -----------------------
    def prepare(self, row) -> _Item:
        it, task, fe = row.item, self.task, self.frontend
        if it.get("error"):  # a recipe's bad row (affjax.eval.recipes)
            raise ValueError(str(it["error"]))
        if not it.get("audio"):
            raise ValueError("missing required field: audio")
        rec = {"task": task} if task not in ("score", "generate") else {}
        for k in ("reference", "language", "source_lang", "target_lang", "choices", "answer"):
            if k in it and task not in ("score", "generate"):
                rec[k] = it[k]
        if task in ("asr", "st") and "reference" in it and not isinstance(it["reference"], str):
            raise ValueError("field 'reference' must be a string")
        prompt = it.get("prompt")
        if prompt is None and task not in ("score", "generate"):
            prompt = fe.default_prompt(task, it)  # Kimi-Audio's qa has none: the question is spoken
        elif not isinstance(prompt, str) or not prompt:
            raise ValueError("'prompt' must be a non-empty string")
        conts = None
        if task == "score":
            c = it.get("continuation")
            if not isinstance(c, str) or not c:
                raise ValueError("missing or non-string 'continuation'")
            conts = [_tokens(fe, c, "continuation")]
        elif task == "qa":
            choices = it.get("choices")
            if choices is not None:
                if not (isinstance(choices, list) and len(choices) >= 2 and all(isinstance(c, str) and c for c in choices)):
                    raise ValueError("'choices' must be a list of at least two non-empty strings")
                rec["answer_index"] = _answer_index(it, choices)
                conts = [_tokens(fe, fe.choice_text(prompt, c), f"choice {c!r}") for c in choices]
            elif not isinstance(it.get("answer"), (str, list)):
                raise ValueError("qa item needs 'choices' + 'answer', or an open 'answer' (a string or a list of them)")
        sr = fe.sampling_rate
        paths = it["audio"] if isinstance(it["audio"], list) else [it["audio"]]
        waves = [load_audio(p, sr=sr) for p in paths]
        seconds = sum(len(w) for w in waves) / sr
        rec["audio_seconds"] = round(seconds, 3)
        enc, rec["windows"] = fe.encode(prompt, waves)
        if self.words is not None:
            enc = self._with_words(row.id, enc, rec)
        longest = len(enc.ids) + max((len(c) for c in conts), default=0) if conts else len(enc.ids)
        shapes.bucket(longest)  # too long for any bucket: an error row, not a crash
        if task == "score":
            rec["num_tokens"] = int(len(conts[0]))
        return _Item(row.id, enc, rec, seconds, conts)

    def _with_words(self, item_id: str, enc, rec: dict):
        """The item's word boundaries and seed for the engine's oracle intervention."""
        if rec["windows"] != 1 or len(enc.feature_lengths) != 1:
            raise ValueError("oracle interventions take one clip of at most 30 s")
        words = self.words.get(item_id)
        if words is None:
            raise ValueError("no word alignment for this item (see alignment.jsonl)")
        rec["words"] = len(words)
        return dataclasses.replace(enc, words=np.array([[w.start, w.end] for w in words], np.float32).reshape(-1, 2),
                                   seed=item_seed(self.engine.oracle, item_id))

    # -- a window of prepared items ---------------------------------------------------------------------
    def run_window(self, items: list[_Item], sink: runner.Sink) -> None:
        self.sink = sink
        self._fill_codes(items)
        if self.two_pass:
            self._encode_pass(items)
        units = []
        for it in items:
            if not it.failed:
                units += [_Unit(it, k) for k in range(len(it.conts))] if it.conts else [_Unit(it, None)]
        if self.two_pass:
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
                lm = self._lm_stored if self.two_pass else self._lm_whole
                for u, o in runner.run_batch(lm, batch, self._unit_failed, retry=not self.multi, log=self.log):
                    if u.item.failed:
                        continue
                    u.item.outputs[u.choice] = o
                    if len(u.item.outputs) == (len(u.item.conts) if u.item.conts else 1):
                        self._finish(u.item)
                sink.store.flush()

    def _fail(self, it: _Item, cause: str) -> None:
        if not it.failed:
            it.failed = True
            self.sink.fail(it.id, cause)

    def _unit_failed(self, u: _Unit, cause: str) -> None:
        self._fail(u.item, cause)

    def _empty(self, score: bool) -> None:
        b = self.frontend.empty_batch(self.bs, score)
        self.engine.score(b) if score else self.engine.generate(b, self.cfg.max_new_tokens)

    def _fill_codes(self, items: list[_Item]) -> None:
        """The speech codes a frontend left pending (Kimi-Audio), for the whole window at once."""
        todo = [it for it in items if getattr(it.enc, "pending", None) is not None]
        if not todo:
            return

        def fill(its):
            return self.clock.timed(lambda: self.frontend.fill_codes([it.enc for it in its]))
        for it, enc in runner.run_batch(fill, todo, self._fail, retry=not self.multi, log=self.log):
            it.enc = enc

    def _encode_pass(self, items: list[_Item]) -> None:
        """Pass 1: encoder, embeddings and input stage for every item, shortest first; each row is
        kept on the host (its valid prefix only)."""
        order = sorted((it for it in items if not it.failed), key=lambda it: len(it.enc.ids))
        chunks = [order[i:i + self.bs] for i in range(0, len(order), self.bs)]
        for chunk in chunks:
            def front(its):
                batch = self._collate([it.enc for it in its])
                return self.clock.timed(lambda: self.engine.front_rows(batch))
            for it, row in runner.run_batch(front, chunk, self._fail, log=self.log):
                it.front = row

    def _collate(self, encs):
        return self.frontend.collate(encs, self.bs)

    def _lm_stored(self, units: list[_Unit]) -> list[dict]:
        """Pass 2: the rest of the prefill (and decoding) for stored rows, continuations appended."""
        eng = self.engine
        score = units[0].cont is not None
        packed = eng.pack_rows([u.item.front for u in units], [u.cont for u in units] if score else None, self.bs)
        self.lm_tokens += packed.tokens
        self.lm_slots += packed.slots
        res, later = self.clock.timed(
            lambda: eng.run_packed(packed, self.front_stages, max_new_tokens=self.cfg.max_new_tokens),
            len(units), self._audio_seconds(units))
        outs = []
        for b, u in enumerate(units):
            f, k = u.item.front, (0 if u.cont is None else len(u.cont))  # the front ran without the continuation
            o = {"audio": f.audio + [int(s["audio_out"][b]) for s in later],
                 "lm": [v + k for v in f.lm] + [int(s["n_valid"][b]) for s in later]}
            o["logprob" if score else "tokens"] = float(res[b]) if score else res[b]
            outs.append(o)
        return outs

    def _lm_whole(self, units: list[_Unit]) -> list[dict]:
        """In-order scheduling (fixed-capacity mode, several processes): each batch runs whole."""
        eng = self.engine
        score = units[0].cont is not None
        batch = self._collate([dataclasses.replace(u.item.enc, cont_ids=u.cont) for u in units])

        def run():
            return eng.score(batch) if score else eng.generate(batch, self.cfg.max_new_tokens)
        res, stats = self.clock.timed(run, len(units), self._audio_seconds(units))
        first = [int(s["n_valid"][b]) for s in stats[:self.front_stages] for b in range(len(units))]
        n_first = first if first else [int(batch.valid[b].sum()) for b in range(len(units))]
        T = shapes.bucket(max(max(n_first), 1)) if first else batch.ids.shape[1]
        self.lm_tokens += int(sum(n_first))
        self.lm_slots += self.bs * min(T, batch.ids.shape[1])
        if eng.record:
            self._add_xla_flops(batch, score)
        outs = []
        for b, u in enumerate(units):
            o = {"audio": [int((batch.span[b] > 0).sum())] + [int(s["audio_out"][b]) for s in stats],
                 "lm": [int(batch.valid[b].sum())] + [int(s["n_valid"][b]) for s in stats]}
            if eng.pool_mode == "fixed" and stats:
                o["forced"] = [int(s["forced"][b]) for s in stats]
            o["logprob" if score else "tokens"] = float(res[b]) if score else res[b]
            outs.append(o)
        return outs

    @staticmethod
    def _audio_seconds(units: list[_Unit]) -> float:
        # each item's audio once (a multiple-choice item's choices share it)
        return sum(u.item.audio_seconds for u in units if not u.choice)

    def _add_xla_flops(self, batch, score: bool) -> None:
        """This batch's LM prefill FLOPs from XLA's cost analysis, pooled (the programs the engine
        just ran) and unpooled (the same batch through an unpooled prefill), the audio encoder +
        embedding program left out of both."""
        eng = self.engine
        unpooled = program_costs(eng.unpooled_programs(batch, extra=0 if score else self.cfg.max_new_tokens,
                                                           score=score))
        pooled = program_costs(eng.programs)
        embed = unpooled["embed"]["flops"]
        self.xla["pooled"] += lm_xla_flops(pooled, embed)
        self.xla["unpooled"] += lm_xla_flops(unpooled, embed)

    # -- results ---------------------------------------------------------------------------------------
    def _finish(self, it: _Item) -> None:
        rec = dict(it.record)
        outs = [it.outputs[k] for k in sorted(it.outputs, key=lambda k: -1 if k is None else k)]
        if self.task == "score":
            rec["logprob"] = outs[0]["logprob"]
        elif it.conts:
            lps = [o["logprob"] for o in outs]
            rec["choice_logprobs"] = lps
            rec["pred"] = int(np.argmax(lps))
            rec["correct"] = rec["pred"] == rec["answer_index"]
        else:
            toks = outs[0]["tokens"]
            rec["text"] = self.frontend.text(toks)
            rec["tokens"] = toks
            if self.task == "qa":
                rec["pred"] = rec["text"]
        rec["audio_tokens"] = outs[0]["audio"]
        rec["lm_tokens"] = [o["lm"] for o in outs]  # per sequence run: valid tokens unpooled, after each stage
        if "forced" in outs[0]:
            rec["forced_merges"] = outs[0]["forced"]
        self.sink.done(it.id, rec)


# ----------------------------------------------------------------------------------------------
# the job


def job_rows(cfg: runner.JobConfig, task: str, out_dir: Path, log):
    """(manifest rows, task, data label, data fingerprint) from --manifest or --data hf:..."""
    if cfg.data and cfg.data.startswith("hf:"):
        data_dir = out_dir / "data"
        manifest = data_dir / "manifest.jsonl"
        recipe = data_dir / "recipe.json"  # written by recipes.load, last: the data set is complete
        if manifest.is_file() and recipe.is_file() and json.loads(recipe.read_text()).get("spec") == cfg.data:
            rtask = json.loads(recipe.read_text())["task"]
        else:
            log(f"building the manifest from {cfg.data} -> {data_dir}")
            _, rtask = recipes.load(cfg.data, data_dir, limit=cfg.limit, progress=cfg.progress)
        if cfg.task is not None and cfg.task != rtask:
            raise runner.UsageError(f"--data {cfg.data} is a {rtask} data set, but --task {cfg.task} was given")
        label = runner.data_label(cfg)
        # a recipe's bad row carries its own `error` (and no audio): prepare reports that cause
        return read_manifest(manifest, required=("id",)), rtask, label, fingerprint_file(manifest)
    if cfg.data == "librivox":
        if task != "asr":
            raise runner.UsageError(f"--data librivox is an asr data set, but --task {task} was given")
        rows, fp = runner.librivox_rows(cfg.limit)
        return rows, task, cfg.data, fp
    if cfg.data is not None:
        raise runner.UsageError(f"--data {cfg.data!r} is not a Qwen2-Audio data set (give --manifest, "
                                "--data librivox or --data hf:DATASET[:CONFIG]:SPLIT)")
    required = {"score": ("id", "audio", "prompt", "continuation"), "generate": ("id", "audio", "prompt")}
    rows = read_manifest(cfg.manifest, required=required.get(task, ("id", "audio")))
    if task == "asr":
        runner.reference_field(rows, cfg.manifest, log)
    if cfg.limit:
        rows = rows[:cfg.limit]
    return rows, task, Path(cfg.manifest).stem, fingerprint_file(cfg.manifest)


def run_lslm(cfg: runner.JobConfig, ckpt: Path, model_label: str, log=print, *, words: dict | None = None,
             loaded=None) -> dict:
    """Run (or resume) a score / generate / eval job on a Qwen2-Audio or Kimi-Audio checkpoint; returns
    the summary. With `cfg.oracle`, one oracle intervention from `words` (item id -> [Word]; see
    affjax.eval.oracle). `loaded`: (model, cfg, frontend) already loaded for `cfg.dtype` and no mesh."""
    t_start = time.perf_counter()
    task = cfg.task
    file_job = task in ("score", "generate")
    if file_job:
        out_dir = Path(cfg.out).parent
    else:
        label = runner.data_label(cfg)
        out_dir = Path(cfg.out or Path("runs") / f"{model_label}-{label}-{task or 'hf'}")
    rows, task, data_label, data_fp = job_rows(cfg, task or "asr", out_dir, log)
    if task not in TASKS:
        raise runner.UsageError(f"unknown task {task!r} ({', '.join(TASKS)})")
    runner.check_rows(rows, f"manifest {cfg.manifest or cfg.data}")
    runner.dedupe_ids(rows)
    meta = json.loads((ckpt / CONFIG_NAME).read_text())
    mcfg = get_spec(meta["model_type"]).config_from_hf(meta["hf_config"])
    try:
        pooling = parse_pooling(cfg.pooling, mcfg.text.layers, positions=cfg.positions, proportional=cfg.proportional)
    except ValueError as e:
        raise runner.UsageError(f"--pooling {cfg.pooling!r}: {e}") from None
    if cfg.pool_mode == "fixed" and pooling.stages and cfg.capacity is None:
        raise runner.UsageError("--pool-mode fixed needs --capacity (a fraction of the audio tokens)")
    if isinstance(cfg.capacity, tuple) and len(cfg.capacity) != len(pooling.stages):
        raise runner.UsageError(f"--capacity gives {len(cfg.capacity)} retentions for {len(pooling.stages)} "
                                "pooling stages (give one, or one per stage)")
    try:
        oracle = parse_oracle(cfg.oracle) if cfg.oracle else None
    except ValueError as e:
        raise runner.UsageError(f"--oracle {cfg.oracle!r}: {e}") from None
    multi = sharding.process_count() > 1
    if oracle is not None and (pooling.stages or multi or meta["model_type"] != "qwen2_audio" or words is None):
        raise runner.UsageError("--oracle runs on a Qwen2-Audio checkpoint without --pooling, in one process")
    if multi and not frontends.FRONTENDS[meta["model_type"]].multi_process:
        raise runner.UsageError(f"model_type {meta['model_type']} runs in one process (a mesh of one host's devices)")
    schedule = cfg.schedule or ("in-order" if file_job else "two-pass")
    two_pass = schedule == "two-pass" and not (cfg.pool_mode == "fixed" and pooling.stages) and not multi
    results = Path(cfg.out) if file_job else out_dir / "results.jsonl"
    record = {"task": task, "model_type": meta["model_type"], "ckpt": fingerprint_checkpoint(ckpt),
              "data": data_fp, "pooling": pooling.to_text() if pooling.stages else "none",
              "positions": pooling.positions, "proportional": bool(pooling.proportional), "pool_mode": cfg.pool_mode,
              "capacity": cfg.capacity if cfg.pool_mode == "fixed" else None,
              "max_new_tokens": cfg.max_new_tokens if task != "score" else None, "dtype": cfg.dtype}
    if oracle is not None:
        record["oracle"] = oracle.to_text()
    open_run(results, record, restart=cfg.restart, log=log)  # before the model: a mismatch costs nothing

    sharding.initialize_distributed()  # a no-op unless launched as several processes
    mesh = sharding.mesh_or_none(cfg.mesh)
    model, mcfg, frontend = loaded if loaded is not None and mesh is None else frontends.load(ckpt, cfg.dtype, mesh)
    engine = Engine(model, pooling=pooling, pool_mode=cfg.pool_mode, capacity=cfg.capacity,
                    eos_ids=frontend.eos_ids, pad_id=frontend.pad_id, mesh=mesh, oracle=oracle)
    t_load = time.perf_counter() - t_start

    # several processes: each runs its share into its own file; process 0 merges them at the end
    all_rows, rows = rows, sharding.host_share(rows)
    path = results.with_name(f"{results.name}.p{sharding.process_index()}") if multi else results
    store = ResultStore(path, log=log)
    lt = LslmTask(task, engine, frontend, cfg, two_pass, log=log, words=words if oracle is not None else None)
    traces0 = dict(runner.TRACES)
    try:
        lt.clock = runner.Clock()
        clock = runner.run_items(lt, rows, store, window=cfg.window, retry_errors=cfg.retry_errors,
                                 progress=cfg.progress, desc=f"{task} {record['pooling']}", log=log, multi=multi,
                                 clock=lt.clock)
        store.compact([r.id for r in rows])
    finally:
        store.close()
    if multi:
        every = sharding.gather_to_host0(list(store.rows.values()))
        if every is None:
            return {"task": task, "process": sharding.process_index(), "written_by": 0, "out": str(results)}
        store = ResultStore(results, log=log)
        for rec in every:
            store.add(rec)
        store.compact([r.id for r in all_rows])
        store.close()
        path.unlink(missing_ok=True)

    summary = summarize(store.ordered([r.id for r in all_rows]), task, mcfg.text, pooling, oracle)
    summary.update({"model": model_label, "data": data_label, "schedule": "two-pass" if two_pass else "in-order",
                    "batch_size": lt.bs, "items": len(all_rows), **clock.summary(),
                    "load_seconds": round(t_load, 3), "total_seconds": round(time.perf_counter() - t_start, 3),
                    "padding_fraction": round(1 - lt.lm_tokens / lt.lm_slots, 4) if lt.lm_slots else None,
                    "compiles": runner.compiles_since(traces0),
                    "mesh": sharding.mesh_text(mesh) if mesh is not None else "one device",
                    "processes": sharding.process_count(), "versions": versions(),
                    "command": command_line()})
    summary.update({k: record[k] for k in ("pooling", "positions", "proportional", "pool_mode", "capacity")})
    if oracle is not None:
        summary["oracle"] = record["oracle"]
    if lt.xla["unpooled"] > 0:
        summary["lm_prefill_flops_ratio_xla"] = round(lt.xla["pooled"] / lt.xla["unpooled"], 4)
        summary.setdefault("lm_prefill_flops", {}).update(xla_pooled=lt.xla["pooled"], xla_unpooled=lt.xla["unpooled"])
    base = results.with_name(results.stem + ".summary") if file_job else out_dir / "summary"
    write_summary(base.with_suffix(".json"), summary, summary_markdown(summary))
    summary["out"] = str(results if file_job else out_dir)
    return summary


# ----------------------------------------------------------------------------------------------
# summaries


def summarize(results: list[dict], task: str, text_cfg, pooling, oracle=None) -> dict:
    """Metrics, error counts, retention and analytic FLOPs from result rows (old and new alike); an
    oracle intervention counts as a stage at the input."""
    ok = [r for r in results if "error" not in r]
    errs = [r for r in results if "error" in r]
    causes: dict[str, int] = {}
    for r in errs:
        kind = r["error"].split(":", 1)[0] if ":" in r["error"] else "error"
        kind = "manifest" if kind.startswith("line ") else kind
        causes[kind] = causes.get(kind, 0) + 1
    out = {"task": task, "ok": len(ok), "errors": len(errs), "error_kinds": causes}
    if task in ("asr", "qa", "st"):
        m = metrics.task_metrics(task, ok)
        out.update(metrics=m, primary=list(metrics.primary(task, m)))
    elif task == "score" and ok:
        out["mean_logprob_per_token"] = round(sum(r["logprob"] for r in ok) / max(sum(r["num_tokens"] for r in ok), 1), 6)
    stages = [0] if oracle is not None else pooling.stages
    if ok and stages:
        out.update(retention_summary([r["audio_tokens"] for r in ok]))
        out.update(flops_summary(text_cfg, stages, [c for r in ok for c in r["lm_tokens"]]))
        if any("forced_merges" in r for r in ok):
            out["forced_merges"] = int(sum(sum(r.get("forced_merges", [])) for r in ok))
    elif ok:
        out["final_retention"] = 1.0
        out["lm_prefill_flops_ratio_analytic"] = 1.0
    return out


def fmt_value(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def summary_markdown(s: dict) -> str:
    name, val = s.get("primary") or (None, None)
    lines = [f"# {s['task']}: {s['model']} on {s['data']}", "",
             f"`{s['command']}`", "",
             "| | |", "|---|---|",
             f"| {name or 'metric'} | {fmt_value(val)} |",
             f"| items | {s['items']} ({s['ok']} ok, {s['errors']} errors) |",
             f"| pooling | {s['pooling']}{' +proportional' if s.get('proportional') else ''} ({s['pool_mode']}) |",
             *([f"| oracle intervention | {s['oracle']} |"] if s.get("oracle") else []),
             f"| retention per stage | {fmt_value(s.get('retention_per_stage'))} |",
             f"| final retention | {fmt_value(s.get('final_retention'))} |",
             f"| LM prefill FLOPs vs unpooled (analytic) | {fmt_value(s.get('lm_prefill_flops_ratio_analytic'))} |",
             f"| LM prefill FLOPs vs unpooled (XLA) | {fmt_value(s.get('lm_prefill_flops_ratio_xla'))} |",
             f"| schedule / batch size | {s['schedule']} / {s['batch_size']} |",
             f"| padding fraction (this run) | {fmt_value(s.get('padding_fraction'))} |",
             f"| items/s (this run, incl. compile) | {fmt_value(s.get('items_per_second'))} |",
             f"| RTFx (steady batches) | {fmt_value(s.get('rtfx'))} |",
             f"| compile / run seconds (this run) | {fmt_value(s.get('compile_seconds'))} / {fmt_value(s.get('run_seconds'))} |",
             ""]
    if "metrics" in s:
        lines.append("Metrics: " + json.dumps(s["metrics"]))
    if s.get("error_kinds"):
        lines += ["", "Errors by kind: " + json.dumps(s["error_kinds"])]
    lines += ["", "Versions: " + ", ".join(f"{k} {v}" for k, v in s.get("versions", {}).items())]
    return "\n".join(lines)


def format_lslm_summary(s: dict) -> str:
    name, val = s.get("primary") or (None, None)
    head = f"{s['model']} on {s['data']} ({s['task']}): {s['items']} items, {s['ok']} ok, {s['errors']} errors"
    if name:
        head += f"; {name} {fmt_value(val)}"
    pool = (f"pooling {s['pooling']}{' +proportional' if s.get('proportional') else ''}"
            f"{' oracle ' + s['oracle'] if s.get('oracle') else ''}: retention "
            f"{fmt_value(s.get('final_retention'))}, LM prefill FLOPs {fmt_value(s.get('lm_prefill_flops_ratio_analytic'))} "
            f"of unpooled (XLA {fmt_value(s.get('lm_prefill_flops_ratio_xla'))})")
    speed = (f"{s['schedule']}: {fmt_value(s.get('items_per_second'))} items/s, RTFx {fmt_value(s.get('rtfx'))}, padding "
             f"{fmt_value(s.get('padding_fraction'))}, compile {fmt_value(s.get('compile_seconds'))} s of "
             f"{fmt_value(s.get('run_seconds'))} s; results in {s.get('out')}")
    return "\n".join([head, pool, speed])
