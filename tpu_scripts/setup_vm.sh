#!/usr/bin/env bash
# Put the affjax source on every worker of the TPU VM and install it with JAX for TPU.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_OPTIONS="--name --zone --project --repo --ref --python --remote-dir"
SCRIPT_FLAGS=""

usage() {
  cat <<EOT
Usage: $SCRIPT_NAME [OPTIONS]

On every worker of the TPU VM (--worker=all):
  1. the source: 'git clone' of --repo when it is a git URL (fetch + checkout when already there),
     or a tarball of the local checkout (without .git, .venv, runs) copied with scp and unpacked;
  2. Python: --python, apt-installed with its -venv package when missing (jax 0.10.2 needs
     Python >= 3.11; the Ubuntu 22.04 TPU images have 3.10);
  3. a venv in <remote-dir>/.venv and the README's install command with the 'hf' extra (the
     --data hf:... recipes) plus "jax[tpu]": pip resolves it to the jax/jaxlib version pinned in
     pyproject.toml and the libtpu wheel that version requires;
  4. a check that JAX sees the TPU.
Running it again updates the source and the install.

EOT
  print_options
}

parse_args "$@"
R=$AFFJAX_REMOTE_DIR
PY=$AFFJAX_PYTHON

if is_git_url "$AFFJAX_REPO"; then
  # A branch name is taken from origin (a fetch does not move the local branch); a tag or commit as it is.
  ref=${AFFJAX_REF:-HEAD}
  tpu_ssh all "set -euo pipefail; if [ -d $R/.git ]; then git -C $R fetch --tags --force origin; else git clone $AFFJAX_REPO $R; fi; if git -C $R rev-parse -q --verify origin/$ref >/dev/null; then target=origin/$ref; else target=$ref; fi; git -C $R checkout --force --detach \$target; git -C $R log -1 --oneline"
else
  [ -z "$AFFJAX_REF" ] || warn "--ref applies to a git URL only; copying the working tree of $AFFJAX_REPO"
  tarball="${TMPDIR:-/tmp}/affjax-src-$TPU_NAME.tar.gz"
  run env COPYFILE_DISABLE=1 tar -C "$AFFJAX_REPO" \
    --exclude=./.git --exclude=./.venv --exclude=./runs --exclude=./.cache --exclude=./build \
    --exclude='*.egg-info' --exclude=__pycache__ --exclude=.pytest_cache --exclude=.hypothesis \
    -czf "$tarball" .
  tpu_scp "$tarball" "$TPU_NAME:affjax-src.tar.gz" --worker=all
  tpu_ssh all "set -euo pipefail; mkdir -p $R; tar -xzf affjax-src.tar.gz -C $R; rm -f affjax-src.tar.gz"
  run rm -f "$tarball"
fi

# The TPU check avoids single quotes so that the printed command stays readable.
tpu_ssh all "set -euo pipefail; if ! command -v $PY >/dev/null 2>&1 || ! $PY -c \"import ensurepip, venv\" 2>/dev/null; then sudo apt-get update -q; sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -q $PY $PY-venv; fi; $PY -c \"import sys; sys.exit(sys.version_info < (3, 11))\" || { echo \"$PY is older than 3.11 (jax 0.10.2 needs 3.11)\" >&2; exit 1; }; cd $R; $PY -m venv .venv; .venv/bin/python -m pip install -q --upgrade pip; .venv/bin/python -m pip install -e \".[hf]\" \"jax[tpu]\"; backend=\$(.venv/bin/python -c \"import jax; print(jax.default_backend(), jax.local_device_count(), jax.__version__)\"); echo \"jax: \$backend\"; case \$backend in tpu*) ;; *) echo \"JAX does not see a TPU\" >&2; exit 1 ;; esac"
[ "$DRY_RUN" = 1 ] || say "affjax installed on every worker of $TPU_NAME in ~/$R"
