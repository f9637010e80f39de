"""JSON-lines manifests: one object per line, bad lines reported as rows with an ``error``.

Only a missing (or unreadable) manifest file raises; every bad line becomes a
:class:`ManifestRow` whose ``error`` names the line number (and id, when known) and the cause.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

__all__ = ["ManifestRow", "read_manifest"]


@dataclass
class ManifestRow:
    index: int  # 1-based line number in the manifest
    id: str
    item: dict | None  # the parsed object (audio path resolved), None when the line is unusable
    error: str | None  # None for a good row

    @property
    def ok(self) -> bool:
        return self.error is None


def _resolve_path(item: dict, key: str, base: Path) -> None:
    def resolve(a: str) -> str:
        p = Path(a).expanduser()
        return str(p if p.is_absolute() else (base / p))

    a = item.get(key)
    if isinstance(a, str) and a:
        item[key] = resolve(a)
    elif isinstance(a, list):
        item[key] = [resolve(x) for x in a]


def read_manifest(
    path: str | os.PathLike,
    required: Iterable[str] = ("id", "audio"),
    *,
    audio_key: str = "audio",
) -> list[ManifestRow]:
    """Read a JSON-lines manifest.

    - blank lines are skipped (line numbers still count them);
    - malformed JSON, non-object lines, missing ``required`` fields, non-UTF-8 bytes and duplicate
      ids give rows with ``item=None`` and an ``error`` (the first of duplicate ids stays good);
    - items without ``id`` get ``line-<n>`` (unless ``"id"`` is required);
    - a relative ``audio`` path (or each of a list of them) resolves against the manifest's folder.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"manifest not found: {p}")
    data = p.read_bytes()
    base = p.resolve().parent
    required = tuple(required)
    rows: list[ManifestRow] = []
    seen: dict[str, int] = {}

    for n, raw in enumerate(data.split(b"\n"), 1):
        raw = raw.rstrip(b"\r")
        if n == 1 and raw.startswith(b"\xef\xbb\xbf"):  # UTF-8 BOM
            raw = raw[3:]
        if not raw.strip():
            continue
        fallback_id = f"line-{n}"
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            rows.append(ManifestRow(n, fallback_id, None, f"line {n}: not valid UTF-8 (byte {e.start}: {e.reason})"))
            continue
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as e:
            rows.append(ManifestRow(n, fallback_id, None, f"line {n}: malformed JSON ({e.msg} at column {e.colno})"))
            continue
        if not isinstance(obj, dict):
            rows.append(ManifestRow(n, fallback_id, None, f"line {n}: expected a JSON object, got {type(obj).__name__}"))
            continue

        rid = obj.get("id")
        if rid is None or rid == "":
            rid = fallback_id
        elif not isinstance(rid, (str, int)) or isinstance(rid, bool):
            rows.append(ManifestRow(n, fallback_id, None,
                                    f"line {n}: field 'id' must be a string or integer, got {type(rid).__name__}"))
            continue
        rid = str(rid)

        missing = [k for k in required if obj.get(k) is None or obj.get(k) == ""]
        if missing:
            rows.append(ManifestRow(n, rid, None,
                                    f"line {n} (id {rid!r}): missing required field(s): {', '.join(missing)}"))
            continue
        a = obj.get(audio_key)
        if a is not None and not isinstance(a, str) and not (
                isinstance(a, list) and a and all(isinstance(x, str) and x for x in a)):
            rows.append(ManifestRow(n, rid, None, f"line {n} (id {rid!r}): field {audio_key!r} must be a path "
                                                  f"string or a non-empty list of them, got {type(a).__name__}"))
            continue

        if rid in seen:
            rows.append(ManifestRow(n, rid, None,
                                    f"line {n}: duplicate id {rid!r} (first seen on line {seen[rid]})"))
            continue
        seen[rid] = n

        item = dict(obj)
        item["id"] = rid
        _resolve_path(item, audio_key, base)
        rows.append(ManifestRow(n, rid, item, None))
    return rows
