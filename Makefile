# Two commands do all the set-up on a fresh machine:
#   make main   install everything, then run the main job (real Whisper base weights, real speech)
#   make test   install everything, then run the test suite
#   make test-fast   the same set-up, then the suite without the tests marked slow (the edit loop)
#   make lslm     train lslm-tiny's weights from scratch (after make corpus; hours; resumable; see
#                 docs/training.md) into affjax/train/weights/lslm-tiny.safetensors and lslm-tiny-lora.safetensors
#   make lslm-carry   write the run in progress to affjax/train/weights/lslm-tiny-carry.safetensors, which
#                 make lslm continues from (16 MB: over the 5 MiB tracked-file limit, so not committed; docs/training.md)
#   make corpus   synthetic speech for training (affjax/data/corpus.py; resumable; installs its Debian
#                 engines with apt-get when run as root, see docs/assets.md)
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
AFFJAX_CACHE ?= $(HOME)/.cache/affjax
CORPUS_N ?= 20000

.PHONY: setup assets main test test-fast bench corpus lslm lslm-carry

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e ".[test,assets,tpu]"
	touch $@

setup: $(VENV)/.installed
	$(BIN)/python -m affjax.data.assets install

main: setup
	$(BIN)/affjax eval --model whisper-base --data librivox

test: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile tests

test-fast: setup
	$(BIN)/python -m pytest -q -n 2 --dist loadfile -m "not slow" tests

bench: setup
	$(BIN)/affjax bench --batch 1 4 --repeats 5

CORPUS_APT := fortunes fortunes-min espeak-ng flite festival festvox-kallpc16k festvox-kdlpc16k festvox-us-slt-hts

corpus: $(VENV)/.installed
	@if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then apt-get install -y -q $(CORPUS_APT) >/dev/null; \
	else echo "not root or no apt-get: install the engines yourself: apt-get install -y $(CORPUS_APT)"; fi
	$(BIN)/python -m affjax.data.corpus generate --out $(AFFJAX_CACHE)/corpus --n $(CORPUS_N)

lslm: setup
	$(BIN)/python -m affjax.train.lslm make --work $(AFFJAX_CACHE)/lslm --corpus $(AFFJAX_CACHE)/corpus

lslm-carry: setup
	$(BIN)/python -m affjax.train.lslm carry --work $(AFFJAX_CACHE)/lslm
