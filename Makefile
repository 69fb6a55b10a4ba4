# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-slow bench lint format model model-card toolchains clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The bundled model is tiny and saw few FIM examples: it completes best in the SPM layout,
# one line at a time (MODEL_CARD.md). Official CodeGemma weights use the default PSM layout.
demo: $(STAMP)
	$(BIN)/codegemma complete --show --mode line --fim-mode spm \
	  --prefix 'import os\n\n\ndef main(filename):\n    path = os.path.' \
	  --suffix '\n    return path\n'

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# Compilers and runtimes of BabelCode's eight languages (as root; installs only what is missing).
toolchains:
	bash scripts/install_toolchains.sh

test-slow: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_generate.py
	$(BIN)/python benchmarks/bench_gemv.py
	$(BIN)/python benchmarks/bench_prefix_cache.py
	$(BIN)/python benchmarks/bench_sandbox.py
	$(BIN)/python benchmarks/bench_data.py
	$(BIN)/python benchmarks/bench_train.py
	$(BIN)/python benchmarks/bench_serve.py

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: $(STAMP)
	$(BIN)/ruff format src tests benchmarks

# The bundled model: the whole recipe on this machine's CPython standard library (see MODEL_CARD.md).
MODEL_DIR := src/codegemma/assets/codegemma-tiny
BUILD := build/model
CG := $(BIN)/codegemma
EVAL := --model $(MODEL_DIR) --batch-size 32 --quiet

model: $(STAMP)
	rm -rf $(BUILD) build/corpus
	$(BIN)/python scripts/stdlib_corpus.py build/corpus
	$(CG) tokenizer train build/corpus/train --vocab-size 8192 --out $(BUILD)/tokenizer
	$(CG) data prepare cpython=build/corpus/train/Lib --out $(BUILD)/data \
	  --tokenizer $(BUILD)/tokenizer --seq-len 512 --quiet
	$(CG) data prepare cpython=build/corpus/heldout/Lib --out $(BUILD)/heldout \
	  --tokenizer $(BUILD)/tokenizer --seq-len 512 --quiet
	$(CG) train --config configs/codegemma-tiny.toml
	$(BIN)/python scripts/export_model.py $(BUILD)/run $(MODEL_DIR)
	$(MAKE) model-card

# Evaluate the exported model and write its card (also after a `make model` interrupted late).
model-card: $(STAMP)
	$(CG) train plot $(BUILD)/run --out $(MODEL_DIR)/loss.png
	$(CG) eval run humaneval-single-line $(EVAL) --out $(BUILD)/eval/single-line
	$(CG) eval run humaneval $(EVAL) --out $(BUILD)/eval/humaneval
	# every 5th of the 5815 multi-line tasks keeps the CPU evaluation to minutes (the card says so)
	$(CG) eval run humaneval-multi-line $(EVAL) --every 5 --out $(BUILD)/eval/multi-line
	$(BIN)/python scripts/model_card.py --corpus build/corpus --data $(BUILD)/data \
	  --run $(BUILD)/run --model $(MODEL_DIR) --eval $(BUILD)/eval/* --out $(MODEL_DIR)/MODEL_CARD.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
