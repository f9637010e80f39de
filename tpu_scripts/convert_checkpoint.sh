#!/usr/bin/env bash
# Download a hub checkpoint on every worker of the TPU VM and convert it with checkpoints_convert/convert.py.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_OPTIONS="--name --zone --project --remote-dir --hf-model --hf-dir --ckpt-dir --dtype"
SCRIPT_FLAGS="--overwrite"

usage() {
  cat <<EOT
Usage: $SCRIPT_NAME [OPTIONS]

On every worker of the TPU VM (each host restores its own shards from its own disk):
'hf download --local-dir' of --hf-model, then
'python checkpoints_convert/convert.py --src HF_DIR --dst CKPT_DIR --dtype DTYPE'.
Skipped where CKPT_DIR/affjax_config.json exists (the converter leaves nothing behind when it
fails), unless --overwrite. Needs setup_vm.sh first.

EOT
  print_options
}

parse_args "$@"
R=$AFFJAX_REMOTE_DIR
CKPT=$AFFJAX_CKPT_DIR
HF=$AFFJAX_HF_DIR

if [ "$AFFJAX_OVERWRITE" = 1 ]; then
  skip="" overwrite=" --overwrite"
else
  skip="if [ -f $CKPT/affjax_config.json ]; then echo \"$CKPT is converted already (--overwrite converts again)\"; exit 0; fi; "
  overwrite=""
fi
tpu_ssh all "set -euo pipefail; ${skip}mkdir -p $(dirname "$CKPT") $HF; $R/.venv/bin/hf download $HF_MODEL --local-dir $HF; $R/.venv/bin/python $R/checkpoints_convert/convert.py --src $HF --dst $CKPT --dtype $AFFJAX_DTYPE$overwrite; du -sh $CKPT"
[ "$DRY_RUN" = 1 ] || say "checkpoint ~/$CKPT ready on every worker of $TPU_NAME"
