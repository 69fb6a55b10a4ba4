# Two commands do everything on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-slow bench lint format model model-card model-sweep model-ablation toolchains llamacpp clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

# The bundled model is tiny and its PSM infilling is still poor (MODEL_CARD.md): it completes best
# in the SPM layout, one line at a time. Official CodeGemma weights use the default PSM layout.
demo: $(STAMP)
	$(BIN)/codegemma complete --show --mode line --fim-mode spm \
	  --prefix 'import os\n\n\ndef main(filename):\n    path = os.path.' \
	  --suffix '\n    return path\n'

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2

# Compilers and runtimes of BabelCode's eight languages (as root; installs only what is missing).
toolchains:
	bash scripts/install_toolchains.sh

# llama.cpp, built once into ~/.cache: the anchor of tests/test_llamacpp_interop.py and the
# llama.cpp benchmarks (scripts/build_llamacpp.py; about an hour on 2 cores).
llamacpp: $(STAMP)
	$(BIN)/python scripts/build_llamacpp.py

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

# The bundled model: the whole recipe on this machine's CPython standard library and the
# permissively licensed pure-Python packages of its site-packages (see MODEL_CARD.md).
MODEL_DIR := src/codegemma/assets/codegemma-tiny
BUILD := build/model
CG := $(BIN)/codegemma
MBPP := src/codegemma/eval/tasks/data/mbpp/mbpp.jsonl
PREPARE := --tokenizer $(BUILD)/tokenizer --seq-len 512 --mbpp $(MBPP) --quiet
# Two stages (MODEL_CARD.md): stage 1 on rows whose syntax middles keep a line's indentation in
# the prefix (--line-align-rate 0), stage 2 continues from it on rows drawn with another seed and
# the default line alignment (half of the middles widened to whole lines, the shape of an
# editor's or a benchmark's line infill).
STAGE1 := $(PREPARE) --line-align-rate 0
STAGE2 := $(PREPARE) --seed 1
TRAIN_SRC = cpython=build/corpus/train/Lib $$(cat build/corpus/packages-train.txt)
HELDOUT_SRC = cpython=build/corpus/heldout/Lib $$(cat build/corpus/packages-heldout.txt)
EVAL := --model $(MODEL_DIR) --batch-size 32 --quiet

model: $(STAMP)
	rm -rf $(BUILD) build/corpus
	$(BIN)/python scripts/stdlib_corpus.py build/corpus --packages
	$(CG) tokenizer train build/corpus/train/Lib --vocab-size 8192 --out $(BUILD)/tokenizer
	$(CG) data prepare $(TRAIN_SRC) --out $(BUILD)/data $(STAGE1)
	$(CG) data prepare $(HELDOUT_SRC) --out $(BUILD)/heldout $(STAGE1)
	$(CG) train --config configs/codegemma-tiny.toml
	$(BIN)/python scripts/export_model.py $(BUILD)/run $(BUILD)/stage1
	$(CG) data prepare $(TRAIN_SRC) --out $(BUILD)/data-lines $(STAGE2)
	$(CG) train --config configs/codegemma-tiny-stage2.toml
	$(BIN)/python scripts/export_model.py $(BUILD)/run2 $(MODEL_DIR)
	$(MAKE) model-card

# The short scaling sweep that chose the bundled model's vocabulary, depth and width (after the
# corpus of `make model` is staged): the standard library at three vocabularies, three shapes.
model-sweep: $(STAMP)
	for v in 4096 8192 16384; do \
	  $(CG) tokenizer train build/corpus/train/Lib --vocab-size $$v --out build/sweep/tok$$v && \
	  $(CG) data prepare cpython=build/corpus/train/Lib --out build/sweep/data$$v \
	    --tokenizer build/sweep/tok$$v --seq-len 512 --mbpp $(MBPP) --quiet && \
	  $(CG) data prepare cpython=build/corpus/heldout/Lib --out build/sweep/heldout$$v \
	    --tokenizer build/sweep/tok$$v --seq-len 512 --mbpp $(MBPP) --quiet || exit 1; \
	done
	$(BIN)/python scripts/scaling_sweep.py --out build/sweep/result.json --steps 80 \
	  --data 8192=build/sweep/data8192:build/sweep/heldout8192 \
	  --data 4096=build/sweep/data4096:build/sweep/heldout4096 \
	  --data 16384=build/sweep/data16384:build/sweep/heldout16384 \
	  --shape 6x256 --shape 4x192 --shape 8x384

# The card's ablation (after `make model` has prepared build/model): FIM level, repository mask,
# and the packages, each trained for the same small budget.
model-ablation: $(STAMP)
	$(CG) data prepare $(TRAIN_SRC) --out build/ablation/data-document --fim-level document $(STAGE1)
	$(CG) data prepare cpython=build/corpus/train/Lib --out build/ablation/data-stdlib $(STAGE1)
	$(BIN)/python scripts/recipe_ablation.py --out build/ablation/result.json --steps 120 \
	  --data $(BUILD)/data --document-data build/ablation/data-document \
	  --stdlib-data build/ablation/data-stdlib --heldout $(BUILD)/heldout --every 5

# Evaluate the exported model and write its card (also after a `make model` interrupted late).
model-card: $(STAMP)
	$(CG) train plot $(BUILD)/run2 --out $(MODEL_DIR)/loss.png
	$(CG) eval run humaneval-single-line $(EVAL) --out $(BUILD)/eval/single-line
	$(CG) eval run humaneval-multi-line $(EVAL) --out $(BUILD)/eval/multi-line
	$(CG) eval run humaneval $(EVAL) --out $(BUILD)/eval/humaneval
	$(CG) eval run mbpp $(EVAL) --out $(BUILD)/eval/mbpp
	for lang in cpp csharp go java javascript kotlin python rust; do \
	  $(CG) eval run bc-humaneval-$$lang $(EVAL) --out $(BUILD)/eval/bc-humaneval-$$lang || exit 1; \
	done
	cd tests/eval/data/lm_tasks && $(abspath $(CG)) eval lm-eval --model $(abspath $(MODEL_DIR)) \
	  --include-path . --out $(abspath $(BUILD))/eval/lm-local \
	  --tasks codegemma_test_mc,codegemma_test_gen,codegemma_test_ppl
	$(BIN)/python scripts/model_card.py --corpus build/corpus --data $(BUILD)/data-lines \
	  --run $(BUILD)/run $(BUILD)/run2 --model $(MODEL_DIR) --eval $(BUILD)/eval/* \
	  --sweep build/sweep/result.json --ablation build/ablation/result.json \
	  --out $(MODEL_DIR)/MODEL_CARD.md

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache
