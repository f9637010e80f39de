#!/usr/bin/env bash
# Copy the run folders (results.jsonl, summary.json, report.txt) from worker 0 of the TPU VM.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_OPTIONS="--name --zone --project --runs-dir --out"
SCRIPT_FLAGS=""

usage() {
  cat <<EOT
Usage: $SCRIPT_NAME [OPTIONS]

Copies the results under RUNS_DIR from worker 0 of the TPU VM (process 0 writes them) into the
local --out folder: a tarball made on the VM without the data/ folders (the prepared audio, GBs),
'gcloud compute tpus tpu-vm scp' of it, unpacked into OUT/<last part of RUNS_DIR>/<split>/<preset>/
(results.jsonl, summary.json) with report.md and report.png. Fetching again refreshes the files.

EOT
  print_options
}

parse_args "$@"
RUNS=${AFFJAX_RUNS_DIR%/}
base=$(basename "$RUNS")
tarball="affjax-results-$TPU_NAME.tar.gz"
tpu_ssh 0 "set -euo pipefail; tar -czf $tarball --exclude=data -C $(dirname "$RUNS") $base"
run mkdir -p "$AFFJAX_OUT"
tpu_scp "$TPU_NAME:$tarball" "$AFFJAX_OUT/$tarball" --worker=0
run tar -xzf "$AFFJAX_OUT/$tarball" -C "$AFFJAX_OUT"
run rm -f "$AFFJAX_OUT/$tarball"
[ "$DRY_RUN" = 1 ] || say "results in $AFFJAX_OUT/$base (table: $AFFJAX_OUT/$base/report.md)"
