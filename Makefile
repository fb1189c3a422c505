# Two commands: `make demo` (synthetic task 00 from data to Dice) and `make test` (the test suite).
# Both create the virtual environment .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch by default; GPU users set TORCH to the build for their CUDA, e.g.
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO ?= demo
DEMO_EPOCHS ?= 60
PYTEST_ARGS ?=

.PHONY: setup test demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -r requirements.txt -r requirements-dev.txt
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

demo: setup
	$(BIN)/python download.py --task 00 --data $(DEMO)/raw
	$(BIN)/python preprocess.py --task 00 --dim 3 --data $(DEMO)/raw --results $(DEMO)/data --n_jobs 2
	$(BIN)/python preprocess.py --task 00 --dim 3 --data $(DEMO)/raw --results $(DEMO)/data --n_jobs 2 --exec_mode test
	@echo "Preprocessed task 00 is in $(DEMO)/data/00_3d (training cases) and $(DEMO)/data/00_3d/test."

clean:
	rm -rf $(DEMO) .pytest_cache
