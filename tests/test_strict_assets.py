"""Strict assets: a missing real asset or torch skips a test on a developer machine and fails it in
CI (``AFFJAX_STRICT_ASSETS=1``, which .ci/run exports, or ``CI`` set), through one helper."""

from pathlib import Path

import pytest
from conftest import missing, need_asset, need_module, strict_assets

from affjax.data.assets import AssetMissing

MESSAGE = "asset X is missing: install it with python -m affjax.data.assets install"


def _lookup():
    raise AssetMissing(MESSAGE)


@pytest.fixture
def lenient(monkeypatch):
    monkeypatch.delenv("AFFJAX_STRICT_ASSETS", raising=False)
    monkeypatch.delenv("CI", raising=False)


def test_missing_skips_by_default(lenient):
    assert not strict_assets()
    with pytest.raises(pytest.skip.Exception) as e:
        need_asset(_lookup)
    assert str(e.value) == MESSAGE
    with pytest.raises(pytest.skip.Exception, match="affjax_no_such_module"):
        need_module("affjax_no_such_module")
    assert need_asset(lambda name: name * 2, "ok") == "okok"  # a present asset is returned


@pytest.mark.parametrize("env", [{"AFFJAX_STRICT_ASSETS": "1"}, {"CI": "true"}, {"CI": "1", "AFFJAX_STRICT_ASSETS": "0"}])
def test_missing_fails_in_strict_mode(lenient, monkeypatch, env):
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    assert strict_assets()
    with pytest.raises(pytest.fail.Exception) as e:
        need_asset(_lookup)
    assert str(e.value) == MESSAGE  # the same message as the skip
    with pytest.raises(pytest.fail.Exception, match="torch is not installed"):
        need_module("affjax_no_such_module", "torch is not installed")
    with pytest.raises(pytest.fail.Exception, match="piper"):
        missing("piper is not installed")


@pytest.mark.parametrize("value", ["", "0", "false", "False", "no", "off"])
def test_off_values_are_not_strict(lenient, monkeypatch, value):
    monkeypatch.setenv("AFFJAX_STRICT_ASSETS", value)
    monkeypatch.setenv("CI", value)
    assert not strict_assets()


def test_ci_runs_strict():
    run = (Path(__file__).resolve().parent.parent / ".ci" / "run").read_text()
    assert "export AFFJAX_STRICT_ASSETS=1" in run.splitlines()
    assert run.index("export AFFJAX_STRICT_ASSETS=1") < run.index("make test")
