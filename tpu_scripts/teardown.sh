#!/usr/bin/env bash
# Delete the TPU VM (asks first unless --yes).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_OPTIONS="--name --zone --project"
SCRIPT_FLAGS="--yes"

usage() {
  cat <<EOT
Usage: $SCRIPT_NAME [OPTIONS]

Deletes the TPU VM with 'gcloud compute tpus tpu-vm delete' and with it its disks: the converted
checkpoint and any result not copied back with fetch_results.sh. Asks for confirmation on the
terminal unless --yes; without a terminal and without --yes it refuses.

EOT
  print_options
}

parse_args "$@"
location_args
what="TPU VM $TPU_NAME in $TPU_ZONE${TPU_PROJECT:+ (project $TPU_PROJECT)}"
if [ "$DRY_RUN" = 1 ]; then
  [ "$ASSUME_YES" = 1 ] || say "# would ask: delete $what?"
elif [ "$ASSUME_YES" != 1 ]; then
  [ -t 0 ] || die "not deleting $what: no terminal to confirm on; pass --yes to delete without asking"
  printf 'Delete %s, its disks and every result not fetched? [y/N] ' "$what"
  answer=''
  read -r answer || true
  case $answer in
    y|Y|yes|YES) ;;
    *) say "not deleted"; exit 1 ;;
  esac
fi
run gcloud compute tpus tpu-vm delete "$TPU_NAME" "${LOC[@]}" --quiet
[ "$DRY_RUN" = 1 ] || say "deleted $what"
