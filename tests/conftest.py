"""Shared test setup: single-threaded numerics and small real-format fixtures."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

try:
    import torch

    torch.set_num_threads(1)
except ImportError:  # torch is only needed for reference/parity tests
    torch = None

import pytest


@pytest.fixture(scope="session")
def tiny_qwen2_audio_dir(tmp_path_factory):
    """A tiny random Qwen2-Audio checkpoint + processor (real Qwen2 tokenizer), built once."""
    if torch is None:
        pytest.skip("torch is not installed (needed to build the reference checkpoint)")
    from affjax.assets import AssetMissing

    try:
        from affjax.assets import qwen2_tokenizer_json

        qwen2_tokenizer_json()
    except AssetMissing as e:
        pytest.skip(str(e))
    from affjax.testing import make_tiny_qwen2_audio

    return make_tiny_qwen2_audio(tmp_path_factory.mktemp("tiny_qwen2_audio"), seed=0)


@pytest.fixture(scope="session")
def librivox():
    """[(item, float32 samples at 16 kHz)] for the five real LibriVox clips (skips without the asset)."""
    from affjax.assets import AssetMissing, librivox_items
    from affjax.data.audio import load_audio

    try:
        items = librivox_items()
    except AssetMissing as e:
        pytest.skip(str(e))
    assert len(items) == 5
    return [(it, load_audio(it["audio"])) for it in items]
