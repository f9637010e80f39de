"""Shared test setup: single-threaded numerics, small real-format fixtures, and the one place that
decides what a missing real asset (or torch, the reference) does to a test: skip it, or, in strict
mode (``AFFJAX_STRICT_ASSETS=1``, or ``CI`` set as CI sets it), fail it with the same message, so a
CI run cannot pass with the parity checks skipped. Tests call :func:`missing`, :func:`need_asset`
or :func:`need_module` (``from conftest import ...``), never ``pytest.skip`` for these.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# The coarse bucket grid (affjax.runtime.shapes, AFFJAX_SEQ_GRID): every code path as with the policy's
# fine grid, with far fewer compiles; tests/test_shapes.py checks the policy grid itself.
os.environ.setdefault("AFFJAX_SEQ_GRID", "old")
# With libtpu installed (the tpu extra), JAX would look for a TPU: keep the tests on the CPU, the TPU
# devices compile-only (tests/test_aot.py), and libtpu quiet (see affjax.runtime.aot.prepare_env).
from affjax.runtime.aot import prepare_env  # noqa: E402  (imports no jax)

prepare_env()

# One persistent XLA cache for the whole run (its own fresh folder; pytest-xdist workers and the CLI
# subprocesses inherit it): the suite builds many engines over the same tiny models, and each engine's
# jitted pieces would otherwise compile the same programs again. Compile counts are unaffected: they
# count traces (affjax.runtime.compiles), and a cache hit still traces.
# Beside it, a folder the workers share for what one of them converts once (the real Whisper
# checkpoints, `real_whisper`).
if "AFFJAX_COMPILE_CACHE" not in os.environ:
    import atexit
    import shutil
    import tempfile

    _root = tempfile.mkdtemp(prefix="affjax-test-")
    os.environ["AFFJAX_COMPILE_CACHE"] = os.path.join(_root, "xla")
    os.environ.setdefault("AFFJAX_TEST_SHARED", os.path.join(_root, "shared"))
    atexit.register(shutil.rmtree, _root, ignore_errors=True)
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", os.environ["AFFJAX_COMPILE_CACHE"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
# The suite's programs are tiny and run once or twice: LLVM's optimizations cost more than they save
# (compiles about 35 % faster), and so do XLA:CPU's MLIR fusion emitters next to the older elemental
# ones (compiles about 40 % faster again; one codegen thread, as the workers already fill the cores).
# Only machine-code generation changes, not the HLO the tests inspect.
FAST_COMPILE = ("--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true "
                "--xla_cpu_use_fusion_emitters=false --xla_cpu_parallel_codegen_split_count=1")
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + FAST_COMPILE).strip()

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # torch is only needed for reference/parity tests
    torch = None

import importlib

import pytest

_OFF = ("", "0", "false", "no", "off")


def strict_assets() -> bool:
    """True when a missing asset or torch must fail: ``AFFJAX_STRICT_ASSETS`` or ``CI`` set to
    anything but empty / 0 / false / no / off (CI runners set CI=true; .ci/run sets the other)."""
    return any(os.environ.get(k, "").strip().lower() not in _OFF for k in ("AFFJAX_STRICT_ASSETS", "CI"))


def missing(reason: str):
    """A real asset or torch is missing: skip the test, or fail it in strict mode (same message)."""
    if strict_assets():
        pytest.fail(reason, pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def need_asset(lookup, *args, **kw):
    """``lookup(*args, **kw)`` (an affjax.data.assets lookup) or :func:`missing` with its AssetMissing message."""
    from affjax.data.assets import AssetMissing

    try:
        return lookup(*args, **kw)
    except AssetMissing as e:
        missing(str(e))


def need_module(name: str, reason: str | None = None):
    """``pytest.importorskip`` for torch and the other references: the module, or :func:`missing`."""
    try:
        return importlib.import_module(name)
    except ImportError as e:
        missing(reason or f"could not import {name!r}: {e}")


def need_qwen2_tokenizer():
    """torch and the real Qwen2 tokenizer (npm asset): what the tiny Qwen2-Audio checkpoints need."""
    need_module("torch", "torch is not installed (needed to build the reference checkpoint)")
    from affjax.data.assets import qwen2_tokenizer_json

    return need_asset(qwen2_tokenizer_json)


@pytest.fixture(scope="session")
def tiny_qwen2_audio_dir(tmp_path_factory):
    """A tiny random Qwen2-Audio checkpoint + processor (real Qwen2 tokenizer), built once."""
    need_qwen2_tokenizer()
    from affjax.testing import make_tiny_qwen2_audio

    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny_qwen2_audio"), seed=0)


@pytest.fixture(scope="session")
def tiny_qwen2_audio_ckpt(tiny_qwen2_audio_dir, tmp_path_factory):
    """`tiny_qwen2_audio_dir` converted to an affjax checkpoint once (read-only: copy it to change it)."""
    from affjax.models.checkpoint import convert

    return convert(tiny_qwen2_audio_dir, tmp_path_factory.mktemp("tiny_qwen2_audio_ckpt") / "ckpt", progress=False)


@pytest.fixture(scope="session")
def tiny_kimi_release(tmp_path_factory):
    """A tiny random Kimi-Audio release in the real on-disk layout (tests/kimi_reference.py), built once."""
    need_qwen2_tokenizer()
    from kimi_reference import make_tiny_kimi_audio

    return make_tiny_kimi_audio(tmp_path_factory.mktemp("kimi") / "Kimi-Audio-tiny", seed=3)


@pytest.fixture(scope="session")
def tiny_glm4_tokenizer(tmp_path_factory):
    """A tiny GLM-4-Voice speech tokenizer folder (tests/glm4_speech_reference.py), built once."""
    need_module("torch")
    from glm4_speech_reference import make_tiny_glm4_speech_tokenizer

    return make_tiny_glm4_speech_tokenizer(tmp_path_factory.mktemp("glm4") / "glm-4-voice-tokenizer", seed=0)


def convert_cli(*args) -> int:
    """checkpoints_convert/convert.py's main, in this process (no second JAX start-up)."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "checkpoints_convert" / "convert.py"
    spec = importlib.util.spec_from_file_location("affjax_convert_cli", path)
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    return cli.main([str(a) for a in args])


@pytest.fixture(scope="session")
def tiny_kimi_ckpt(tiny_kimi_release, tiny_glm4_tokenizer, tmp_path_factory):
    """`tiny_kimi_release` converted by the converter's command line with --speech-tokenizer, once
    (read-only: copy it to change it)."""
    dst = tmp_path_factory.mktemp("kimi_ckpt") / "ckpt"
    assert convert_cli("--src", tiny_kimi_release, "--dst", dst, "--quiet", "--speech-tokenizer",
                       tiny_glm4_tokenizer) == 0
    return dst


@pytest.fixture(scope="session")
def librivox():
    """[(item, float32 samples at 16 kHz)] for the five real LibriVox clips (skips without the asset)."""
    from affjax.data.assets import librivox_items
    from affjax.data.audio import load_audio

    items = need_asset(librivox_items)
    assert len(items) == 5
    return [(it, load_audio(it["audio"])) for it in items]


@pytest.fixture(scope="session")
def real_whisper(tmp_path_factory):
    """name ("tiny.en", "base") -> (checkpoint dir, $AFFJAX_CACHE folder, model, processor, HF config):
    the installed CTranslate2 Whisper converted once per run into a test cache the workers share,
    laid out as `--model whisper-NAME` finds it, and loaded once per worker (treat the model and the
    folder as read-only)."""
    made = {}
    shared = os.environ.get("AFFJAX_TEST_SHARED")

    def get(name: str):
        if name not in made:
            import fcntl
            from pathlib import Path

            from affjax.data.assets import whisper_ct2_dir
            from affjax.eval.whisper import load_whisper
            from affjax.models.checkpoint import ensure_converted

            src = need_asset(whisper_ct2_dir, name)
            # converted once per run: the first worker converts under the lock, the other finds it
            cache = Path(shared) / f"whisper-{name}" if shared else tmp_path_factory.mktemp("affjax_cache")
            cache.mkdir(parents=True, exist_ok=True)
            with open(cache / ".lock", "w") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                ckpt = ensure_converted(src, cache / "models" / f"whisper-{name}", log=lambda s: None)
            made[name] = (ckpt, cache, *load_whisper(ckpt))
        return made[name]
    return get


# The longest modules first, as measured: `make test` spreads whole modules over two workers (pytest-xdist,
# --dist loadfile), and a long module started last would run alone at the end.
_FIRST = ("test_sharding.py", "test_whisper_eval.py", "test_train.py", "test_smollm2.py", "test_eval_lslm.py",
          "test_jobs.py", "test_whisper_sweep.py", "test_aot.py", "test_pooled_model.py", "test_qwen2_audio.py",
          "test_kimi_jobs.py", "test_whisper.py", "test_bf16.py", "test_pooling_stage.py", "test_flops.py",
          "test_kimi_audio.py")


def pytest_configure(config):
    # pytest-xdist reorders --dist loadfile modules by their number of tests (--loadscope-reorder, on by
    # default), which would undo the order below: a long module of few tests would start last
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_FIRST)}
    items.sort(key=lambda it: rank.get(it.path.name, len(_FIRST)))
