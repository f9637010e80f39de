#!/usr/bin/env bash
# Before any VM is paid for: compile the eval's programs for the slice with the real TPU compiler on
# this machine (`affjax plan --aot`), one per preset, and stop when one does not fit in HBM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_OPTIONS="--accelerator-type --hf-model --ckpt-config --affjax --dtype --presets --mesh --batch-size --out"
SCRIPT_FLAGS=""
NEEDS_GCLOUD=0  # runs on this machine only

usage() {
  cat <<EOT
Usage: $SCRIPT_NAME [OPTIONS]

For every preset: 'affjax plan --aot' on this machine (affjax with its tpu extra: 'make setup' or
pip install -e ".[tpu]"), which compiles every program 'affjax eval' runs (audio encoder, embedding,
each pooling stage, each layer group, head, decode loop) for the slice's topology with the real TPU
compiler, no TPU needed. Pooled presets are compiled with retention 1 per stage (nothing merged: the
most a bucketed eval can hold), rows of 30 s of audio. Exits non-zero, before any VM exists, when a
preset does not fit in HBM; the reports go to OUT/check/<preset>.json. A 7B model takes a few
minutes per preset on 2 cores.

EOT
  print_options
}

parse_args "$@"

config=$AFFJAX_CKPT_CONFIG
if [ -z "$config" ]; then
  case $HF_MODEL in
    Qwen/Qwen2-Audio-7B|Qwen/Qwen2-Audio-7B-Instruct) config=qwen2-audio-7b ;;
    *) die "no --ckpt-config for $HF_MODEL: give the model's config.json on this machine (or leave out the check step: --steps)" ;;
  esac
fi
case $AFFJAX_DTYPE in float16) dtype=bfloat16 ;; *) dtype=$AFFJAX_DTYPE ;; esac  # same bytes per parameter
if [ "$DRY_RUN" = 0 ]; then
  command -v "$AFFJAX_LOCAL" >/dev/null 2>&1 ||
    die "'$AFFJAX_LOCAL' not found: install affjax with its tpu extra here ('make setup'), point --affjax at it, or leave out the check step (--steps)"
fi

common=(plan --aot --topology "$TPU_TOPOLOGY" --ckpt-config "$config" --dtype "$dtype"
        --batch-size "${AFFJAX_BATCH_SIZE:-8}" --audio-seconds 30)
[ -z "$AFFJAX_MESH" ] || common+=(--mesh "$AFFJAX_MESH")
run mkdir -p "$AFFJAX_OUT/check"
too_big=""
for preset in $AFFJAX_PRESETS; do
  pooled=()
  [ "$preset" = none ] || pooled=(--pooling "$preset" --retention 1)
  rc=0
  run "$AFFJAX_LOCAL" "${common[@]}" ${pooled[@]+"${pooled[@]}"} --json "$AFFJAX_OUT/check/$preset.json" || rc=$?
  case $rc in
    0) ;;
    3) too_big="$too_big $preset" ;;
    *) die "affjax plan --aot failed for preset $preset (exit $rc)" ;;
  esac
done
[ -z "$too_big" ] ||
  die "does not fit in the HBM of $TPU_ACCELERATOR_TYPE:$too_big (reports in $AFFJAX_OUT/check): pick a smaller --batch-size, --mesh with model > 1, or a bigger slice"
[ "$DRY_RUN" = 1 ] || say "every preset fits on $TPU_ACCELERATOR_TYPE ($TPU_TOPOLOGY): $AFFJAX_PRESETS"
