#!/usr/bin/env bash
# Create the Cloud TPU VM (skipped when a TPU VM of that name already exists in the zone).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_OPTIONS="--name --zone --project --accelerator-type --runtime --create-args"
SCRIPT_FLAGS=""

usage() {
  cat <<EOT
Usage: $SCRIPT_NAME [OPTIONS]

Creates the Cloud TPU VM with 'gcloud compute tpus tpu-vm create' (a slice of more than one host
gets one VM per host, the workers). Does nothing when a TPU VM of that name exists in the zone.

EOT
  print_options
}

parse_args "$@"
location_args
create_extra=()
[ -z "$TPU_CREATE_ARGS" ] || read -r -a create_extra <<<"$TPU_CREATE_ARGS"

if probe gcloud compute tpus tpu-vm describe "$TPU_NAME" "${LOC[@]}" --format=value\(state\); then
  say "TPU VM $TPU_NAME exists in $TPU_ZONE: not creating it"
  exit 0
fi
run gcloud compute tpus tpu-vm create "$TPU_NAME" "${LOC[@]}" \
  --accelerator-type="$TPU_ACCELERATOR_TYPE" --version="$TPU_RUNTIME" \
  ${create_extra[@]+"${create_extra[@]}"}
[ "$DRY_RUN" = 1 ] || say "created TPU VM $TPU_NAME ($TPU_ACCELERATOR_TYPE, $TPU_RUNTIME) in $TPU_ZONE"
