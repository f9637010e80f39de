#!/usr/bin/env bash
# The whole LibriSpeech pooling experiment on a Cloud TPU VM: create, set up, convert, evaluate,
# fetch the results, tear down. Each step is also a script of its own (see --help).
set -euo pipefail
# shellcheck source-path=SCRIPTDIR source=common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

SCRIPT_OPTIONS="--steps --ckpt-config --affjax --name --zone --project --accelerator-type --runtime --create-args --repo --ref --python --remote-dir --hf-model --hf-dir --ckpt-dir --dtype --presets --splits --mesh --batch-size --eval-args --runs-dir --out"
SCRIPT_FLAGS="--yes --overwrite"
NEEDS_GCLOUD=0  # the step scripts check for it themselves

usage() {
  cat <<EOT
Usage: $SCRIPT_NAME [OPTIONS]

Steps, in this order (--steps picks some; each is a script of its own in tpu_scripts/):
  check     check_fit.sh           affjax plan --aot here: every preset's programs fit the slice's HBM
  create    create_vm.sh           gcloud compute tpus tpu-vm create (skipped when the VM exists)
  setup     setup_vm.sh            source + Python + pip install -e ".[hf]" "jax[tpu]" on every worker
  convert   convert_checkpoint.sh  hf download --hf-model, checkpoints_convert/convert.py
  run       run_librispeech.sh     affjax eval per split x preset (skips finished runs), affjax report
  fetch     fetch_results.sh       copy the results (not the prepared audio) into --out
  teardown  teardown.sh            gcloud compute tpus tpu-vm delete (asks unless --yes)
Every step can be run again: finished work is skipped or refreshed. When a step fails after the VM
exists, the VM is left running and the message says how to resume and how to delete it.

EOT
  print_options
}

ORIG_ARGS=("$@")
parse_args "$@"

# The steps read their settings from the environment (each option's default).
export TPU_NAME TPU_ZONE TPU_PROJECT TPU_ACCELERATOR_TYPE TPU_RUNTIME TPU_CREATE_ARGS AFFJAX_REPO \
  AFFJAX_REF AFFJAX_PYTHON AFFJAX_REMOTE_DIR HF_MODEL AFFJAX_HF_DIR AFFJAX_CKPT_DIR AFFJAX_DTYPE \
  AFFJAX_PRESETS AFFJAX_SPLITS AFFJAX_MESH AFFJAX_BATCH_SIZE AFFJAX_EVAL_ARGS AFFJAX_RUNS_DIR \
  AFFJAX_OUT AFFJAX_OVERWRITE ASSUME_YES DRY_RUN AFFJAX_CKPT_CONFIG AFFJAX_LOCAL

step_script() {
  case $1 in
    check) echo check_fit.sh ;;
    create) echo create_vm.sh ;;
    setup) echo setup_vm.sh ;;
    convert) echo convert_checkpoint.sh ;;
    run) echo run_librispeech.sh ;;
    fetch) echo fetch_results.sh ;;
    teardown) echo teardown.sh ;;
  esac
}

# Steps in their fixed order, whatever the order given.
steps=""
for s in $KNOWN_STEPS; do
  ! in_list "$s" "$AFFJAX_STEPS" || steps="$steps $s"
done
steps=${steps# }

vm_exists=0     # 1 once the VM may exist: from then on a failure must say how to delete it
current=""
remaining=""
on_exit() {
  local rc=$? teardown_cmd resume_cmd
  [ "$rc" -ne 0 ] && [ "$vm_exists" = 1 ] || return 0
  location_args
  teardown_cmd=$(quote_cmd "$TPU_SCRIPTS_DIR/teardown.sh" --name="$TPU_NAME" "${LOC[@]}")
  resume_cmd=$(quote_cmd "$TPU_SCRIPTS_DIR/$SCRIPT_NAME" ${ORIG_ARGS[@]+"${ORIG_ARGS[@]}"} --steps="$remaining")
  cat >&2 <<EOT

$SCRIPT_NAME: step '$current' failed (exit $rc).
The TPU VM $TPU_NAME ($TPU_ZONE) was NOT deleted and is still billed. Either
  resume (finished work is skipped):
    $resume_cmd
  or copy back what is there and delete it:
    $(quote_cmd "$TPU_SCRIPTS_DIR/fetch_results.sh" --name="$TPU_NAME" "${LOC[@]}")
    $teardown_cmd
EOT
}
trap on_exit EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

flags=()
[ "$DRY_RUN" = 1 ] && flags+=(--dry-run)
read -r -a step_list <<<"$steps"
i=0
while [ "$i" -lt "${#step_list[@]}" ]; do
  current=${step_list[$i]}
  remaining="${step_list[*]:$i}"
  case $current in check|create) ;; *) vm_exists=1 ;; esac  # check runs here, before any VM
  say ""
  say "==== step $current: $(step_script "$current")"
  bash "$TPU_SCRIPTS_DIR/$(step_script "$current")" ${flags[@]+"${flags[@]}"}
  [ "$current" != create ] || vm_exists=1
  [ "$current" != teardown ] || vm_exists=0
  i=$((i + 1))
done
say ""
say "==== done: $steps"
