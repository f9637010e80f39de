"""The results store every job writes through (score, generate, every eval), and the run record
that keeps a resumed run from mixing inputs or settings.

`ResultStore`: a JSON-lines file, one row per item id. Rows are appended and fsynced per batch, so a
kill loses nothing already written; reading it back keeps the last row of each id and drops a
torn last line (a write cut by a kill). `compact` rewrites it once, atomically, in manifest order.

`RunRecord` (`<results>.run.json` beside the file): the settings that change results plus content
fingerprints of the inputs: the manifest's bytes (sha256), and the checkpoint's config plus a hash of
its index (every file's name and size, and the bytes of its small metadata files). A rerun with the
same record resumes; with any difference it is refused, naming what changed, unless `restart` is
given, which deletes the old results and starts over.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

__all__ = ["ResultStore", "fingerprint_file", "fingerprint_checkpoint", "open_run", "RunMismatch"]

_SMALL = 1 << 20  # files under this size are hashed whole (checkpoint metadata and index files)


class RunMismatch(ValueError):
    pass


class ResultStore:
    """Result rows of one run, keyed by item id; see the module docstring."""

    def __init__(self, path: str | os.PathLike, log=print):
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
        tmp = self.path.with_name(self.path.name + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            for k in sorted(self.rows, key=lambda k: rank.get(k, len(rank))):
                f.write(json.dumps(self.rows[k], ensure_ascii=False) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        self._f = open(self.path, "a", encoding="utf-8")

    def ordered(self, order: list[str]) -> list[dict]:
        return [self.rows[k] for k in order if k in self.rows]

    def close(self) -> None:
        self._f.close()


def fingerprint_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def fingerprint_checkpoint(ckpt: str | os.PathLike) -> str:
    """The checkpoint's config and index: every file's relative name and size, and the bytes of the
    small ones (config, orbax metadata, tokenizer). Large weight files count by size only: hashing
    31 GB per run would cost minutes, and a rewritten checkpoint also rewrites its metadata."""
    root = Path(ckpt)
    h = hashlib.sha256()
    for p in sorted(q for q in root.rglob("*") if q.is_file()):
        size = p.stat().st_size
        h.update(f"{p.relative_to(root).as_posix()}\0{size}\0".encode())
        if size < _SMALL:
            h.update(p.read_bytes())
    return h.hexdigest()


def open_run(results_path: Path, record: dict, *, restart: bool = False, log=print) -> None:
    """Check `record` against the run record beside `results_path` (refuse a mismatch, or start over
    with `restart`), then write it. Call before any heavy work."""
    path = results_path.with_name(results_path.name + ".run.json")
    if restart:
        for p in (results_path, path):
            if p.exists():
                p.unlink()
        log(f"--restart: starting {results_path} over")
    elif path.exists() or results_path.exists():
        try:
            old = json.loads(path.read_text())
        except (OSError, ValueError):
            old = None
        if not isinstance(old, dict):
            raise RunMismatch(f"{results_path} exists without a readable run record ({path.name}): it was not made "
                              "by this version of affjax; give --restart to start over, or another --out")
        diff = [k for k in sorted(set(old) | set(record)) if old.get(k) != record.get(k)]
        if diff:
            what = ", ".join(f"{k}: {_short(old.get(k))} -> {_short(record.get(k))}" for k in diff)
            raise RunMismatch(f"{results_path} holds a run with other inputs or settings ({what}); give --restart "
                              "to start over, or another --out")
    results_path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=1) + "\n")


def _short(v) -> str:
    s = repr(v)
    return s if len(s) <= 24 else s[:12] + "..." + s[-8:]
