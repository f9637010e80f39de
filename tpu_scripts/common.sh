# shellcheck shell=bash
# Shared by the tpu_scripts/*.sh scripts (sourced, not run): settings with environment-variable
# defaults, one option parser, `run` (print a command, then execute it unless DRY_RUN=1) and the
# gcloud wrappers. Plain bash; works with bash 3.2 (macOS) too: no associative arrays, and empty
# arrays are expanded as ${a[@]+"${a[@]}"} (set -u).
#
# A script sets SCRIPT_OPTIONS (the value options it takes), SCRIPT_FLAGS (its flags besides
# --dry-run and --help) and a usage() function, then calls `parse_args "$@"`, which parses,
# checks every value the script uses and derives the settings left empty.

# Variables set here are read by the scripts that source this file.
# shellcheck disable=SC2034

TPU_SCRIPTS_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
AFFJAX_ROOT=$(cd "$TPU_SCRIPTS_DIR/.." && pwd)
SCRIPT_NAME=$(basename "$0")

# ---- settings: the environment variable is the default, the option overrides it ----------------
TPU_NAME=${TPU_NAME:-affjax-librispeech}
TPU_ZONE=${TPU_ZONE:-us-west4-a}
TPU_PROJECT=${TPU_PROJECT:-}                  # empty: gcloud's configured project
TPU_ACCELERATOR_TYPE=${TPU_ACCELERATOR_TYPE:-v5litepod-8}
TPU_RUNTIME=${TPU_RUNTIME:-}                  # empty: the runtime for the accelerator type
TPU_CREATE_ARGS=${TPU_CREATE_ARGS:-}          # more flags for `tpu-vm create`, e.g. --spot
AFFJAX_REPO=${AFFJAX_REPO:-$AFFJAX_ROOT}      # git URL, or a local folder copied with scp
AFFJAX_REF=${AFFJAX_REF:-}                    # git URL only: branch / tag / commit (default: the remote's HEAD)
AFFJAX_PYTHON=${AFFJAX_PYTHON:-python3.11}    # jax 0.10.2 needs Python >= 3.11; Ubuntu 22.04 images have 3.10
AFFJAX_REMOTE_DIR=${AFFJAX_REMOTE_DIR:-affjax}
HF_MODEL=${HF_MODEL:-Qwen/Qwen2-Audio-7B}
AFFJAX_DTYPE=${AFFJAX_DTYPE:-bfloat16}
AFFJAX_HF_DIR=${AFFJAX_HF_DIR:-}              # empty: hf/<model name>
AFFJAX_CKPT_DIR=${AFFJAX_CKPT_DIR:-}          # empty: ckpt/<model name>-<dtype>
AFFJAX_PRESETS=${AFFJAX_PRESETS:-none input dap-conservative dap-aggressive}
AFFJAX_SPLITS=${AFFJAX_SPLITS:-test-clean test-other}
AFFJAX_MESH=${AFFJAX_MESH:-}
AFFJAX_BATCH_SIZE=${AFFJAX_BATCH_SIZE:-}
AFFJAX_EVAL_ARGS=${AFFJAX_EVAL_ARGS:-}
AFFJAX_RUNS_DIR=${AFFJAX_RUNS_DIR:-affjax-runs/librispeech}
AFFJAX_OUT=${AFFJAX_OUT:-}                    # empty: runs/tpu/<name> in this checkout
AFFJAX_CKPT_CONFIG=${AFFJAX_CKPT_CONFIG:-}    # check step: the model's config.json here (empty: known for Qwen2-Audio-7B)
AFFJAX_LOCAL=${AFFJAX_LOCAL:-}                # check step: affjax on this machine (empty: .venv/bin/affjax or affjax)
AFFJAX_STEPS=${AFFJAX_STEPS:-check create setup convert run fetch teardown}
AFFJAX_OVERWRITE=${AFFJAX_OVERWRITE:-0}
ASSUME_YES=${ASSUME_YES:-0}
DRY_RUN=${DRY_RUN:-0}

KNOWN_STEPS="check create setup convert run fetch teardown"

# ---- messages ------------------------------------------------------------------------------------
say() { printf '%s\n' "$*"; }
warn() { printf '%s: warning: %s\n' "$SCRIPT_NAME" "$*" >&2; }
die() { printf '%s: error: %s\n' "$SCRIPT_NAME" "$*" >&2; exit 1; }
die_usage() { printf '%s: error: %s (see %s --help)\n' "$SCRIPT_NAME" "$*" "$SCRIPT_NAME" >&2; exit 2; }

# ---- options -------------------------------------------------------------------------------------
# option_doc OPTION -> "VARIABLE|METAVAR|description"
option_doc() {
  case $1 in
    --name) echo "TPU_NAME|NAME|TPU VM name" ;;
    --zone) echo "TPU_ZONE|ZONE|zone, e.g. us-west4-a (v5e), us-central2-b (v4)" ;;
    --project) echo "TPU_PROJECT|PROJECT|Google Cloud project (empty: gcloud's configured one)" ;;
    --accelerator-type) echo "TPU_ACCELERATOR_TYPE|TYPE|v5litepod-8, v4-8, v5p-8, v6e-8, ... (bigger slices: several hosts)" ;;
    --runtime) echo "TPU_RUNTIME|VERSION|TPU software version (empty: v2-alpha-tpuv5-lite for v5e, v2-alpha-tpuv5 for v5p, v2-alpha-tpuv6e for v6e, tpu-ubuntu2204-base for v4 and older)" ;;
    --create-args) echo "TPU_CREATE_ARGS|ARGS|more flags for 'gcloud compute tpus tpu-vm create', e.g. \"--spot\"" ;;
    --repo) echo "AFFJAX_REPO|URL_OR_DIR|git URL cloned on the VM, or a local folder copied with scp (default: this checkout)" ;;
    --ref) echo "AFFJAX_REF|REF|with a git URL: branch, tag or commit to check out (empty: the remote's HEAD)" ;;
    --python) echo "AFFJAX_PYTHON|PYTHON|Python on the VM (apt-installed with its -venv package when missing)" ;;
    --remote-dir) echo "AFFJAX_REMOTE_DIR|DIR|repository folder on the VM (relative: under the home folder)" ;;
    --hf-model) echo "HF_MODEL|REPO_ID|Hugging Face hub model to download and convert" ;;
    --hf-dir) echo "AFFJAX_HF_DIR|DIR|download folder on the VM (empty: hf/<model name>)" ;;
    --ckpt-dir) echo "AFFJAX_CKPT_DIR|DIR|converted checkpoint on the VM (empty: ckpt/<model name>-<dtype>)" ;;
    --dtype) echo "AFFJAX_DTYPE|DTYPE|parameter dtype of the converted checkpoint: bfloat16, float32 or float16" ;;
    --presets) echo "AFFJAX_PRESETS|\"P ...\"|pooling presets, one eval each per split" ;;
    --splits) echo "AFFJAX_SPLITS|\"S ...\"|LibriSpeech splits: test-clean, test-other, dev-clean, dev-other" ;;
    --mesh) echo "AFFJAX_MESH|MESH|device mesh for eval, e.g. data=4,model=2 (empty: affjax's default; see the plan printed first)" ;;
    --batch-size) echo "AFFJAX_BATCH_SIZE|N|eval batch size (empty: affjax's default)" ;;
    --eval-args) echo "AFFJAX_EVAL_ARGS|ARGS|more arguments for 'affjax eval'" ;;
    --runs-dir) echo "AFFJAX_RUNS_DIR|DIR|run folders on the VM, one per split/preset (relative: under the home folder)" ;;
    --out) echo "AFFJAX_OUT|DIR|local folder the results are copied into (empty: runs/tpu/<name> in this checkout)" ;;
    --steps) echo "AFFJAX_STEPS|\"STEP ...\"|steps to do, in this order: $KNOWN_STEPS" ;;
    --ckpt-config) echo "AFFJAX_CKPT_CONFIG|CONFIG|check step: the model's config.json on this machine (empty: qwen2-audio-7b for Qwen/Qwen2-Audio-7B)" ;;
    --affjax) echo "AFFJAX_LOCAL|COMMAND|check step: affjax on this machine, with its tpu extra (empty: this checkout's .venv/bin/affjax, else affjax)" ;;
    *) return 1 ;;
  esac
}

# flag_doc FLAG -> "VARIABLE|description"
flag_doc() {
  case $1 in
    --yes) echo "ASSUME_YES|delete the TPU VM without asking" ;;
    --overwrite) echo "AFFJAX_OVERWRITE|convert again even when the checkpoint exists" ;;
    *) return 1 ;;
  esac
}

in_list() {  # in_list WORD "LIST OF WORDS"
  case " $2 " in *" $1 "*) return 0 ;; *) return 1 ;; esac
}

print_options() {  # the option part of --help, for this script's options
  local opt doc var meta text value
  say "Options (the environment variable in brackets is the default):"
  for opt in $SCRIPT_OPTIONS; do
    doc=$(option_doc "$opt")
    var=${doc%%|*}; doc=${doc#*|}
    meta=${doc%%|*}; text=${doc#*|}
    value=${!var}
    printf '  %-34s %s\n' "$opt $meta" "$text"
    printf '  %-34s [%s=%s]\n' "" "$var" "$value"
  done
  for opt in $SCRIPT_FLAGS; do
    doc=$(flag_doc "$opt")
    printf '  %-34s %s [%s=1]\n' "$opt" "${doc#*|}" "${doc%%|*}"
  done
  printf '  %-34s %s\n' "--dry-run" "print every command, run none (gcloud not needed) [DRY_RUN=1]"
  printf '  %-34s %s\n' "-h, --help" "this help"
}

parse_args() {
  local opt val var has_val
  while [ $# -gt 0 ]; do
    case $1 in
      -h|--help) usage; exit 0 ;;
      --dry-run) DRY_RUN=1; shift; continue ;;
      --) die_usage "unexpected argument '--'" ;;
      -*) ;;
      *) die_usage "unexpected argument '$1'" ;;
    esac
    opt=$1 has_val=0 val=
    case $opt in --*=*) val=${opt#*=}; opt=${opt%%=*}; has_val=1 ;; esac
    if in_list "$opt" "$SCRIPT_FLAGS"; then
      [ "$has_val" = 0 ] || die_usage "option $opt takes no value"
      var=$(flag_doc "$opt"); var=${var%%|*}
      printf -v "$var" '%s' 1
      shift
      continue
    fi
    in_list "$opt" "$SCRIPT_OPTIONS" || die_usage "unknown option '$opt'"
    if [ "$has_val" = 0 ]; then
      [ $# -ge 2 ] || die_usage "option $opt needs a value"
      val=$2
      shift
    fi
    shift
    var=$(option_doc "$opt"); var=${var%%|*}
    printf -v "$var" '%s' "$val"
  done
  case $DRY_RUN in 0|1) ;; *) die "DRY_RUN must be 0 or 1, got '$DRY_RUN'" ;; esac
  derive_settings
  for opt in $SCRIPT_OPTIONS; do check_option "$opt"; done
  if [ "$DRY_RUN" = 1 ]; then
    say "# dry run: every command is printed, none is run"
  elif [ "${NEEDS_GCLOUD:-1}" = 1 ]; then
    command -v gcloud >/dev/null 2>&1 ||
      die "gcloud not found: install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install), or pass --dry-run"
  fi
}

model_basename() { printf '%s\n' "${HF_MODEL##*/}"; }

derive_settings() {
  if [ -z "$TPU_RUNTIME" ]; then
    case $TPU_ACCELERATOR_TYPE in
      v6e-*) TPU_RUNTIME=v2-alpha-tpuv6e ;;
      v5litepod-*|v5e-*) TPU_RUNTIME=v2-alpha-tpuv5-lite ;;
      v5p-*) TPU_RUNTIME=v2-alpha-tpuv5 ;;
      *) TPU_RUNTIME=tpu-ubuntu2204-base ;;
    esac
  fi
  [ -n "$AFFJAX_HF_DIR" ] || AFFJAX_HF_DIR="hf/$(model_basename)"
  [ -n "$AFFJAX_CKPT_DIR" ] || AFFJAX_CKPT_DIR="ckpt/$(model_basename)-$AFFJAX_DTYPE"
  [ -n "$AFFJAX_OUT" ] || AFFJAX_OUT="$AFFJAX_ROOT/runs/tpu/$TPU_NAME"
  if [ -z "$AFFJAX_LOCAL" ]; then
    if [ -x "$AFFJAX_ROOT/.venv/bin/affjax" ]; then AFFJAX_LOCAL="$AFFJAX_ROOT/.venv/bin/affjax"; else AFFJAX_LOCAL=affjax; fi
  fi
  # `affjax plan --topology` names: v5litepod-8 is v5e-8 there.
  case $TPU_ACCELERATOR_TYPE in
    v5litepod-*) TPU_TOPOLOGY="v5e-${TPU_ACCELERATOR_TYPE#v5litepod-}" ;;
    *) TPU_TOPOLOGY=$TPU_ACCELERATOR_TYPE ;;
  esac
}

matches() { [[ $1 =~ $2 ]]; }  # matches STRING EXTENDED_REGEX

check_path() {  # a path used inside remote shell commands: no spaces or shell characters
  matches "$2" '^[A-Za-z0-9_./~+-]+$' || die_usage "$1 must be a plain path (letters, digits, _ . / ~ + -), got '$2'"
}

check_option() {
  local w
  case $1 in
    --name) matches "$TPU_NAME" '^[a-z]([-a-z0-9]{0,61}[a-z0-9])?$' ||
      die_usage "--name must be lowercase letters, digits and hyphens, starting with a letter, got '$TPU_NAME'" ;;
    --zone) matches "$TPU_ZONE" '^[a-z]+-[a-z]+[0-9]+-[a-z]$' ||
      die_usage "--zone must look like us-west4-a, got '$TPU_ZONE'" ;;
    --project) [ -z "$TPU_PROJECT" ] || matches "$TPU_PROJECT" '^[a-z][-a-z0-9.:]*[a-z0-9]$' ||
      die_usage "--project is not a project id: '$TPU_PROJECT'" ;;
    --accelerator-type) matches "$TPU_ACCELERATOR_TYPE" '^v[0-9]+[a-z]*-[0-9]+$' ||
      die_usage "--accelerator-type must look like v5litepod-8 or v4-8, got '$TPU_ACCELERATOR_TYPE'" ;;
    --runtime) matches "$TPU_RUNTIME" '^[a-z0-9][-a-z0-9.]*$' ||
      die_usage "--runtime is not a TPU software version: '$TPU_RUNTIME'" ;;
    --create-args) for w in $TPU_CREATE_ARGS; do
        matches "$w" '^--[a-z]' || die_usage "--create-args takes gcloud flags (--flag or --flag=value), got '$w'"
      done ;;
    --repo) if is_git_url "$AFFJAX_REPO"; then
        matches "$AFFJAX_REPO" '^[A-Za-z0-9@:/._~+%-]+$' || die_usage "--repo: unexpected characters in '$AFFJAX_REPO'"
      else
        [ -f "$AFFJAX_REPO/pyproject.toml" ] ||
          die_usage "--repo must be a git URL or a local checkout of affjax (no pyproject.toml in '$AFFJAX_REPO')"
      fi ;;
    --ref) [ -z "$AFFJAX_REF" ] || matches "$AFFJAX_REF" '^[A-Za-z0-9_./-]+$' || die_usage "--ref: unexpected characters in '$AFFJAX_REF'" ;;
    --python) matches "$AFFJAX_PYTHON" '^python3(\.[0-9]+)?$' || die_usage "--python must be python3 or python3.N, got '$AFFJAX_PYTHON'" ;;
    --remote-dir) check_path "$1" "$AFFJAX_REMOTE_DIR" ;;
    --hf-model) matches "$HF_MODEL" '^[A-Za-z0-9][-A-Za-z0-9_.]*/[-A-Za-z0-9_.]+$' ||
      die_usage "--hf-model must be a hub id like Qwen/Qwen2-Audio-7B, got '$HF_MODEL'" ;;
    --hf-dir) check_path "$1" "$AFFJAX_HF_DIR" ;;
    --ckpt-dir) check_path "$1" "$AFFJAX_CKPT_DIR" ;;
    --dtype) in_list "$AFFJAX_DTYPE" "bfloat16 float32 float16" ||
      die_usage "--dtype must be bfloat16, float32 or float16, got '$AFFJAX_DTYPE'" ;;
    --presets) [ -n "${AFFJAX_PRESETS// /}" ] || die_usage "--presets is empty"
      for w in $AFFJAX_PRESETS; do
        matches "$w" '^[a-z][a-z0-9-]*$' ||
          die_usage "--presets takes preset names (none input dap-conservative dap-aggressive), got '$w'"
      done ;;
    --splits) [ -n "${AFFJAX_SPLITS// /}" ] || die_usage "--splits is empty"
      for w in $AFFJAX_SPLITS; do
        in_list "$w" "test-clean test-other dev-clean dev-other" ||
          die_usage "--splits takes test-clean, test-other, dev-clean, dev-other; got '$w'"
      done ;;
    --mesh) [ -z "$AFFJAX_MESH" ] || matches "$AFFJAX_MESH" '^[a-z]+=[0-9]+(,[a-z]+=[0-9]+)*$' ||
      die_usage "--mesh must look like data=4,model=2, got '$AFFJAX_MESH'" ;;
    --batch-size) [ -z "$AFFJAX_BATCH_SIZE" ] || matches "$AFFJAX_BATCH_SIZE" '^[1-9][0-9]*$' ||
      die_usage "--batch-size must be a positive integer, got '$AFFJAX_BATCH_SIZE'" ;;
    --eval-args) for w in $AFFJAX_EVAL_ARGS; do
        matches "$w" '^[A-Za-z0-9_@%+=:,./-]+$' || die_usage "--eval-args: unexpected characters in '$w'"
      done ;;
    --runs-dir) check_path "$1" "$AFFJAX_RUNS_DIR" ;;
    --out) [ -n "$AFFJAX_OUT" ] || die_usage "--out is empty" ;;
    --steps) [ -n "${AFFJAX_STEPS// /}" ] || die_usage "--steps is empty"
      for w in $AFFJAX_STEPS; do
        in_list "$w" "$KNOWN_STEPS" || die_usage "unknown step '$w' (steps: $KNOWN_STEPS)"
      done ;;
  esac
}

is_git_url() {
  case $1 in
    http://*|https://*|ssh://*|git://*|file://*) return 0 ;;
    *@*:*) return 0 ;;  # git@github.com:owner/repo.git
    *) return 1 ;;
  esac
}

# ---- running commands ----------------------------------------------------------------------------
# quote_cmd ARG... -> one copy-pasteable command line: plain words as they are, others in '...'.
quote_cmd() {
  local out='' a opt plain='^[A-Za-z0-9_@%+=:,./-]+$' option='^--[A-Za-z0-9-]+=' q="'" sq="'\\''"
  for a in "$@"; do
    opt=''
    if [[ $a =~ $option ]]; then  # --flag='value': only the value quoted
      opt=${BASH_REMATCH[0]}
      a=${a#"$opt"}
    fi
    if [[ $a =~ $plain ]]; then
      out="$out $opt$a"
    else
      out="$out $opt'${a//$q/$sq}'"
    fi
  done
  printf '%s\n' "${out# }"
}

# run CMD ARG...: print the command (after "+ "), then run it unless DRY_RUN=1.
run() {
  printf '+ %s\n' "$(quote_cmd "$@")"
  [ "$DRY_RUN" = 1 ] && return 0
  "$@"
}

# probe CMD ARG...: a check whose exit status is the answer (0 yes, 1 no). Printed like run;
# in a dry run it is not run and answers no. Its standard output is dropped.
probe() {
  printf '+ %s\n' "$(quote_cmd "$@")"
  [ "$DRY_RUN" = 1 ] && return 1
  "$@" >/dev/null
}

location_args() {  # --zone and --project for gcloud, into the array LOC
  LOC=(--zone="$TPU_ZONE")
  [ -z "$TPU_PROJECT" ] || LOC+=(--project="$TPU_PROJECT")
}

# tpu_ssh WORKER COMMAND: run a shell command on one worker (0, 1, ...) or on all of them (all).
# The command runs in the home folder on the VM, under the login shell (bash on the TPU images).
tpu_ssh() {
  local LOC; location_args
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$1" --command="$2"
}

# tpu_ssh_test WORKER COMMAND: like tpu_ssh for a command that answers with its exit status
# (0 yes, 1 no); any other status (255: ssh failed) stops the script. A dry run answers no.
tpu_ssh_test() {
  local LOC rc=0; location_args
  probe gcloud compute tpus tpu-vm ssh "$TPU_NAME" "${LOC[@]}" --worker="$1" --command="$2" || rc=$?
  case $rc in
    0) return 0 ;;
    1) return 1 ;;
    *) die "ssh to worker $1 of $TPU_NAME failed (exit $rc)" ;;
  esac
}

# tpu_scp ARG...: gcloud compute tpus tpu-vm scp ARG... --zone ... [--project ...]
tpu_scp() {
  local LOC; location_args
  run gcloud compute tpus tpu-vm scp "$@" "${LOC[@]}"
}
