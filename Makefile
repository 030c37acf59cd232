# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-stamp
# The CPU build of torch; plain `torch` would pull a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install pull serve test test-fast generate clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e ".[dev,bench]"
	touch $(STAMP)

install: $(STAMP)

pull: install
	$(VENV)/bin/llmserve pull

serve: pull
	$(VENV)/bin/llmserve serve --model default --host $(HOST) --port $(PORT)

generate: pull
	$(VENV)/bin/llmserve generate --model default --chat --prompt "What is the capital of France?" --temperature 0

# pytest exits 5 when it collects no tests; make turns that into a failure.
test: pull
	$(PY) -m pytest -q -p no:cacheprovider

test-fast: install
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow"

clean:
	rm -rf $(VENV) checkpoints/smollm2-135m-instruct engines
