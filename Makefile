# Two commands: `make demo` (synthetic task 00 from data to Dice) and `make test` (the test suite).
# Both create the virtual environment .venv first.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch by default; GPU users set TORCH to the build for their CUDA, e.g.
#   make test TORCH="torch --index-url https://download.pytorch.org/whl/cu124"
TORCH ?= torch==2.13.0
BIN := $(VENV)/bin
DEMO ?= demo
DEMO_EPOCHS ?= 15
PYTEST_ARGS ?=

.PHONY: setup test demo lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: requirements.txt requirements-dev.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install $(TORCH)
	$(BIN)/pip install -r requirements.txt -r requirements-dev.txt
	touch $@

test: setup
	$(BIN)/python -m pytest $(PYTEST_ARGS)

lint: setup
	$(BIN)/ruff check .

# The demo: synthetic task 00 from raw data to Dice on the CPU (a few minutes on 2 cores).
demo: setup
	$(BIN)/python download.py --task 00 --data $(DEMO)/raw
	$(BIN)/python preprocess.py --task 00 --dim 3 --data $(DEMO)/raw --results $(DEMO)/data --n_jobs 2
	$(BIN)/python preprocess.py --task 00 --dim 3 --data $(DEMO)/raw --results $(DEMO)/data --n_jobs 2 --exec_mode val
	$(BIN)/python preprocess.py --task 00 --dim 3 --data $(DEMO)/raw --results $(DEMO)/data --n_jobs 2 --exec_mode test
	rm -rf $(DEMO)/results $(DEMO)/validation
	$(BIN)/python main.py --exec_mode train --data $(DEMO)/data/00_3d --results $(DEMO)/results --gpus 0 --fold 0 \
		--epochs $(DEMO_EPOCHS) --train_batches 25 --eval_every 3 --batch_size 2 --filters 16 32 64 128 --learning_rate 3e-3 \
		--seed 0 --save_ckpt
	$(BIN)/python main.py --exec_mode predict --data $(DEMO)/data/00_3d --results $(DEMO)/results --gpus 0 \
		--ckpt_path $(DEMO)/results/checkpoints/best.ckpt --save_preds --overlay
	$(BIN)/python main.py --exec_mode predict --data $(DEMO)/data/00_3d/val --fold 0 --results $(DEMO)/validation \
		--gpus 0 --ckpt_path $(DEMO)/results/checkpoints/best.ckpt --save_preds
	$(BIN)/python evaluate.py --preds $(DEMO)/validation/predictions --lbls $(DEMO)/raw/Task00_Synthetic/labelsTr \
		--dataset_json $(DEMO)/raw/Task00_Synthetic/dataset.json --predicted_only
	@echo "Test-set predictions (NIfTI and overlays): $(DEMO)/results/predictions"

clean:
	rm -rf $(DEMO) .pytest_cache
