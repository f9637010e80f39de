"""`affjax report RUN_DIR [RUN_DIR ...] [--out report.md] [--plot report.png]`: one table across runs.

Each RUN_DIR holds the ``summary.json`` of an eval run. Two forms are read:

- the eval runner's: ``task``, ``model``, ``data``, ``pooling``, ``metrics`` (from
  :func:`affjax.eval.metrics.task_metrics`), ``primary`` ([name, value]), ``final_retention``,
  ``retention_per_stage``, ``lm_prefill_flops_ratio_analytic``, ``items``, ``ok``, ``errors``,
  ``items_per_second``, ``padding_fraction``, ``versions``, ``command``;
- the Whisper ASR eval's (affjax/eval/whisper.py): top-level ``wer``, ``final_retention``, ``flops_rel``
  (its FLOPs ratio, shown in the same column), ``seconds``; or ``{"runs": [summary, ...]}`` for its
  unpooled + pooled job, one table row per run (labelled ``DIR/setting``).

Missing keys print as ``-``. A RUN_DIR without a readable ``summary.json`` is reported on stderr
(and in the markdown file) naming the directory; the other runs are still reported, and the exit
status is 1. The plot (matplotlib, Agg) has one row of panels per headline metric (WER, CER, BLEU,
accuracy ...): that metric against final retention (left) and against the FLOPs ratio (right), one
series per task / data set / model, points joined in x order and labelled with their pooling setting.

``--by FIELD --manifest M`` adds a table of WER per value of a manifest field (e.g. the corpus'
``engine`` or ``voice``): each run's ``results.jsonl`` (``RUN_DIR/SETTING/results.jsonl`` for the
Whisper form) is joined to the manifest by ``id`` and scored with the run's normaliser; items with an
error are counted, not scored.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from affjax.eval.metrics import primary

__all__ = ["load_runs", "run_rows", "format_table", "plot_runs", "breakdown", "format_breakdown", "main_report",
           "COLUMNS"]

# (header, key in the row dict)
COLUMNS = (
    ("run", "run"), ("task", "task"), ("model", "model"), ("data", "data"), ("pooling", "pooling"),
    ("metric", "metric"), ("value", "value"), ("retention", "final_retention"), ("FLOPs ratio", "flops_ratio"),
    ("items", "items"), ("ok", "ok"), ("errors", "errors"), ("items/s", "items_per_second"),
    ("padding", "padding_fraction"),
)

_PERCENT_METRICS = ("wer", "cer", "accuracy")


class SummaryError(Exception):
    pass


def _read_summary(run_dir: Path) -> dict:
    p = run_dir / "summary.json"
    if not run_dir.exists():
        raise SummaryError(f"{run_dir}: no such directory")
    if not run_dir.is_dir():
        raise SummaryError(f"{run_dir}: not a directory")
    if not p.is_file():
        raise SummaryError(f"{run_dir}: no summary.json (did the run finish?)")
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError) as e:
        raise SummaryError(f"{run_dir}: cannot read summary.json ({type(e).__name__}: {e})") from None
    except json.JSONDecodeError as e:
        raise SummaryError(f"{run_dir}: corrupt summary.json ({e.msg} at line {e.lineno}, column {e.colno})") from None
    if not isinstance(data, dict):
        raise SummaryError(f"{run_dir}: summary.json holds a {type(data).__name__}, expected an object")
    return data


def _num(x):
    if isinstance(x, bool) or x is None:
        return None
    if isinstance(x, (int, float)) and math.isfinite(x):
        return float(x)
    return None


def _primary(s: dict) -> tuple[str | None, float | None]:
    p = s.get("primary")
    if isinstance(p, (list, tuple)) and len(p) == 2 and isinstance(p[0], str):
        return p[0], _num(p[1])
    m = s.get("metrics") if isinstance(s.get("metrics"), dict) else s
    task = s.get("task")
    if task in ("asr", "st", "qa"):
        name, value = primary(task, m)
        if value is not None or name in m:
            return name, _num(value)
    for name in ("wer", "cer", "bleu", "accuracy"):
        if name in m:
            return name, _num(m[name])
    return None, None


def _sub_runs(run_dir: Path, summary: dict) -> list[tuple[str | None, dict]]:
    """(setting, run summary) pairs: one (None, summary), or one per run of the {"runs": [...]} form."""
    runs = summary.get("runs")
    if isinstance(runs, list) and runs:
        subs = [(r.get("setting") or str(k), r) for k, r in enumerate(runs) if isinstance(r, dict)]
        if not subs:
            raise SummaryError(f"{run_dir}: summary.json 'runs' holds no run objects")
        return subs
    return [(None, summary)]


def run_rows(run_dir: Path, summary: dict) -> list[dict]:
    """Table rows (dicts keyed by COLUMNS' keys) for one summary; several for the {"runs": [...]} form."""
    rows = []
    for setting, s in _sub_runs(run_dir, summary):
        name, value = _primary(s)
        flops = s.get("lm_prefill_flops_ratio_analytic", s.get("flops_rel"))
        row = {
            "run": run_dir.name if setting is None else f"{run_dir.name}/{setting}",
            "dir": str(run_dir),
            "task": s.get("task"), "model": s.get("model"), "data": s.get("data"), "pooling": s.get("pooling"),
            "metric": name, "value": value,
            "final_retention": _num(s.get("final_retention")), "flops_ratio": _num(flops),
            "items": s.get("items"), "ok": s.get("ok"), "errors": s.get("errors"),
            "items_per_second": _num(s.get("items_per_second")),
            "padding_fraction": _num(s.get("padding_fraction")),
        }
        if row["items_per_second"] is None and _num(s.get("seconds")) and isinstance(s.get("items"), int):
            row["items_per_second"] = s["items"] / s["seconds"]  # the Whisper eval writes seconds only
        rows.append(row)
    return rows


def load_runs(run_dirs) -> tuple[list[dict], list[str]]:
    """(table rows, error messages) for the given run directories, in the order given."""
    rows, errors = [], []
    for d in run_dirs:
        d = Path(d)
        try:
            rows += run_rows(d, _read_summary(d))
        except SummaryError as e:
            errors.append(str(e))
    return rows, errors


def _fmt(key: str, row: dict) -> str:
    v = row.get(key)
    if v is None or v == "":
        return "-"
    if key == "value":
        if (row.get("metric") or "").split("_")[0] in _PERCENT_METRICS:
            return f"{100 * v:.2f}%"
        return f"{v:.2f}"
    if key in ("final_retention", "flops_ratio", "padding_fraction"):
        return f"{v:.3f}"
    if key == "items_per_second":
        return f"{v:.2f}"
    return str(v).replace("|", "\\|")


def format_table(rows: list[dict]) -> str:
    head = "| " + " | ".join(h for h, _ in COLUMNS) + " |"
    sep = "|" + "|".join("---" for _ in COLUMNS) + "|"
    return "\n".join([head, sep] + ["| " + " | ".join(_fmt(k, r) for _, k in COLUMNS) + " |" for r in rows])


def plot_runs(rows: list[dict], path) -> Path:
    """PNG: headline metric vs final retention and vs FLOPs ratio, one series per task / data / model."""
    import matplotlib  # deferred: matplotlib is heavy; only --plot needs it

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics_seen = []
    for r in rows:
        if r["metric"] and r["value"] is not None and r["metric"] not in metrics_seen:
            metrics_seen.append(r["metric"])
    n = max(1, len(metrics_seen))
    fig, axes = plt.subplots(n, 2, figsize=(11, 3.8 * n), squeeze=False)
    for i, metric in enumerate(metrics_seen):
        pct = metric.split("_")[0] in _PERCENT_METRICS
        groups: dict[str, list[dict]] = {}
        for r in rows:
            if r["metric"] == metric and r["value"] is not None:
                groups.setdefault(f"{r['task'] or '?'} / {r['data'] or '?'} / {r['model'] or '?'}", []).append(r)
        for j, (xkey, xlabel) in enumerate((("final_retention", "final retention (audio tokens kept)"),
                                            ("flops_ratio", "FLOPs ratio (vs unpooled)"))):
            ax = axes[i][j]
            plotted = False
            for label, rs in sorted(groups.items()):
                pts = sorted((r[xkey], r["value"] * (100 if pct else 1), r) for r in rs if r[xkey] is not None)
                if not pts:
                    continue
                xs, ys = [p[0] for p in pts], [p[1] for p in pts]
                ax.plot(xs, ys, marker="o", label=label)
                for x, y, r in pts:
                    ax.annotate(str(r["pooling"] or r["run"])[:28], (x, y), textcoords="offset points",
                                xytext=(4, 4), fontsize=7)
                plotted = True
            ax.set_xlabel(xlabel)
            ax.set_ylabel(f"{metric.upper()}{' (%)' if pct else ''}")
            ax.grid(True, alpha=0.3)
            if plotted:
                ax.legend(fontsize=8)
            else:
                ax.text(0.5, 0.5, f"no runs with {xkey}", ha="center", va="center", transform=ax.transAxes)
    if not metrics_seen:
        for ax in axes[0]:
            ax.text(0.5, 0.5, "no runs with a headline metric", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Affinity Pooling: accuracy vs retention and FLOPs")
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def _manifest_field(path: Path, field: str) -> dict[str, str]:
    """id -> the field's value (``-`` where an item lacks it); a bad line is an error naming it."""
    from affjax.data.manifest import read_manifest

    try:
        rows = read_manifest(path, required=("id",))
    except OSError as e:
        raise SummaryError(f"--manifest {path}: cannot read ({type(e).__name__}: {e})") from None
    bad = next((r for r in rows if r.item is None), None)
    if bad is not None:
        raise SummaryError(f"--manifest {path} line {bad.index}: {bad.error}")
    return {r.id: str(r.item.get(field, "-")) for r in rows}


def _score_groups(results: Path, groups: dict[str, str], normalizer: str) -> dict[str, dict]:
    from affjax.eval.metrics import make_normalizer, word_errors  # deferred: transformers, jiwer

    norm, _ = make_normalizer(kind="basic" if normalizer.startswith("basic") else "english")
    acc: dict[str, dict] = {}
    for n, line in enumerate(results.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            key = groups.get(str(r["id"]), "(not in the manifest)")
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise SummaryError(f"{results} line {n}: not a result row ({type(e).__name__})") from None
        for k in (key, "all"):
            g = acc.setdefault(k, {"items": 0, "failed": 0, "words": 0, "errors": 0})
            g["items"] += 1
            if "error" in r or "text" not in r:
                g["failed"] += 1
                continue
            ref, hyp = norm(r.get("reference") or ""), norm(r["text"] or "")
            e = word_errors([ref], [hyp])[0]
            if e is not None:
                g["words"] += len(ref.split())
                g["errors"] += e
    return acc


def breakdown(run_dirs, manifest, field: str) -> tuple[list[dict], list[str]]:
    """(rows: run, value, items, failed, words, wer; error messages): each run's WER per value of
    the manifest's ``field``, and over all its items."""
    try:
        groups = _manifest_field(Path(manifest), field)
    except SummaryError as e:
        return [], [str(e)]
    rows, errors = [], []
    for d in map(Path, run_dirs):
        try:
            summary = _read_summary(d)
            for setting, sub in _sub_runs(d, summary):
                results = d / "results.jsonl" if setting is None else d / setting / "results.jsonl"
                if not results.is_file():
                    raise SummaryError(f"{d}: no {results.relative_to(d)} to break down")
                normalizer = sub.get("normalizer") or (sub.get("metrics") or {}).get("normalizer") or "english"
                acc = _score_groups(results, groups, normalizer)
                for value in sorted(acc, key=lambda v: (v == "all", v)):
                    g = acc[value]
                    rows.append({"run": d.name if setting is None else f"{d.name}/{setting}", "value": value, **g,
                                 "wer": g["errors"] / g["words"] if g["words"] else None})
        except SummaryError as e:
            errors.append(str(e))
    return rows, errors


def format_breakdown(rows: list[dict], field: str) -> str:
    def pct(x):
        return "-" if x is None else f"{100 * x:.2f}%"

    head = f"| run | {field} | items | failed | words | WER |\n|---|---|---|---|---|---|"
    return "\n".join([head] + [f"| {r['run']} | {r['value']} | {r['items']} | {r['failed']} | {r['words']} | "
                                f"{pct(r['wer'])} |" for r in rows])


def main_report(args) -> int:
    rows, errors = load_runs(args.run_dirs)
    by = getattr(args, "by", None)
    if by and not getattr(args, "manifest", None):
        errors.append("--by needs --manifest (the JSONL whose field groups the items)")
    elif by:
        brows, berrors = breakdown(args.run_dirs, args.manifest, by)
        errors += [e for e in berrors if e not in errors]
    for e in errors:
        print(f"report: {e}", file=sys.stderr)
    table = format_table(rows) if rows else "(no runs to report)"
    if by and getattr(args, "manifest", None):
        table += f"\n\nWER by {by} (manifest {Path(args.manifest).name}):\n\n" + (
            format_breakdown(brows, by) if brows else "(nothing to break down)")
    print(table)
    if getattr(args, "out", None):
        text = "# affjax report\n\n" + table + "\n"
        if errors:
            text += "\nNot reported:\n\n" + "".join(f"- {e}\n" for e in errors)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text, encoding="utf-8")
        print(f"table written to {out}")
    if getattr(args, "plot", None):
        p = plot_runs(rows, args.plot)
        print(f"plot written to {p}")
    return 1 if errors else 0
