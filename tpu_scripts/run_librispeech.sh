#!/usr/bin/env bash
# LibriSpeech ASR with affjax eval on the TPU VM: every split x pooling preset, then one report.
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_OPTIONS="--name --zone --project --accelerator-type --remote-dir --hf-model --ckpt-dir --dtype --presets --splits --mesh --batch-size --eval-args --runs-dir"
SCRIPT_FLAGS=""

usage() {
  cat <<EOT
Usage: $SCRIPT_NAME [OPTIONS]

On the TPU VM: prints 'affjax plan' for the slice (worker 0), then for every split and preset
  affjax eval --ckpt CKPT --task asr --data hf:openslr/librispeech_asr:<clean|other>:<test|validation>
              --out RUNS_DIR/<split>/<preset> --pooling <preset> [--batch-size N] [--mesh M]
on every worker at once (a multi-host slice runs one JAX process per host; process 0 writes the
results), and finally 'affjax report' over all run folders (worker 0): RUNS_DIR/report.md and
RUNS_DIR/report.png. affjax eval keeps the audio it prepares in <run folder>/data/.

Resumable: a run whose summary.json exists on worker 0 is skipped; an unfinished one is started
again and affjax eval resumes from its results.jsonl. So after a failure or a dropped ssh
connection, run this script again. Needs setup_vm.sh and convert_checkpoint.sh first.

EOT
  print_options
}

parse_args "$@"
R=$AFFJAX_REMOTE_DIR
CKPT=$AFFJAX_CKPT_DIR
RUNS=$AFFJAX_RUNS_DIR

split_data() {
  case $1 in
    test-clean) echo hf:openslr/librispeech_asr:clean:test ;;
    test-other) echo hf:openslr/librispeech_asr:other:test ;;
    dev-clean) echo hf:openslr/librispeech_asr:clean:validation ;;
    dev-other) echo hf:openslr/librispeech_asr:other:validation ;;
  esac
}

extra=""
[ -z "$AFFJAX_BATCH_SIZE" ] || extra="$extra --batch-size $AFFJAX_BATCH_SIZE"
[ -z "$AFFJAX_MESH" ] || extra="$extra --mesh $AFFJAX_MESH"
[ -z "$AFFJAX_EVAL_ARGS" ] || extra="$extra $AFFJAX_EVAL_ARGS"

say "== memory plan for $TPU_TOPOLOGY (pick --mesh from it; without --mesh every device is on 'data')"
tpu_ssh 0 "$R/.venv/bin/affjax plan --ckpt-config $CKPT --topology $TPU_TOPOLOGY" ||
  warn "affjax plan failed (unknown topology $TPU_TOPOLOGY?); going on"

run_dirs=""
for split in $AFFJAX_SPLITS; do
  data=$(split_data "$split")
  for preset in $AFFJAX_PRESETS; do
    dir="$RUNS/$split/$preset"
    run_dirs="$run_dirs $dir"
    say "== $split, pooling $preset -> $dir"
    if tpu_ssh_test 0 "test -f $dir/summary.json"; then
      say "$dir/summary.json exists: done, skipped"
      continue
    fi
    tpu_ssh all "set -euo pipefail; mkdir -p $dir; $R/.venv/bin/affjax eval --ckpt $CKPT --task asr --data $data --out $dir --pooling $preset$extra"
  done
done

say "== report"
tpu_ssh 0 "$R/.venv/bin/affjax report$run_dirs --out $RUNS/report.md --plot $RUNS/report.png"
