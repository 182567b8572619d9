# Set-up and the two main entry points. Everything runs in the project's own .venv.
VENV ?= .venv
PY := $(VENV)/bin/python
PYTHON ?= python3
# On a machine without a GPU, `make TORCH_INDEX=https://download.pytorch.org/whl/cpu demo` installs
# the CPU-only torch wheels first: PyPI's wheels bring 4.1 GB of CUDA libraries (nvidia, triton)
# of the 6.6 GB venv (measured 2026-12-07). Empty (the default): torch from PyPI.
TORCH_INDEX ?=

.PHONY: demo test bench bench-search bench-postprocess bench-train bench-finetune bench-serve clean-venv

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(if $(TORCH_INDEX),$(VENV)/bin/pip install -q torch torchvision --index-url $(TORCH_INDEX))
	$(VENV)/bin/pip install -q -e '.[dev]'
	touch $@

## Extract and evaluate: real rParis6k-mini from ../shared when present, else generated images.
## `make demo DEMO=--full`: three scales instead of one (about three times as long).
demo: $(VENV)/.installed
	$(PY) scripts/demo.py $(DEMO)

## The test suite (CPU only; tests that need ../shared skip with a reason when it is absent).
test: $(VENV)/.installed
	scripts/install_browser.sh
	$(PY) -m pytest -q

## Benchmarks whose figures go into BENCHMARKS.md (bench-search at 1M takes about half an hour).
bench: $(VENV)/.installed
	$(PY) benchmarks/extract.py

bench-search: $(VENV)/.installed
	$(PY) benchmarks/search.py --sizes 100000,1000000 --write

bench-postprocess: $(VENV)/.installed
	$(PY) benchmarks/postprocess.py --write

## Plain vs multistage training step (about 20 min on 2 CPU cores; --device cuda on a GPU).
bench-train: $(VENV)/.installed
	$(PY) benchmarks/train.py --write

## Fine-tuning on rParis6k-mini, leave-landmarks-out (about 25 min on 2 CPU cores).
bench-finetune: $(VENV)/.installed
	$(PY) benchmarks/finetune.py --write

## imret serve under load (about 3 min), then on a 100k-image store with the page in Chromium (about 10 min).
bench-serve: $(VENV)/.installed
	$(PY) benchmarks/serve.py --write
	$(PY) benchmarks/serve.py --synthetic 100000 --threads 1 --section serve-100k --write
	$(PY) benchmarks/page.py --write

clean-venv:
	rm -rf $(VENV)
