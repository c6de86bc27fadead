# Two commands on a fresh machine: `make bench` (the main job, no downloads) and `make test`.
# Both create .venv and install the package with all extras on first use.

PYTHON ?= python3
VENV ?= .venv
ASSETS ?= $(if $(VLPRUNE_ASSETS),$(VLPRUNE_ASSETS),$(wildcard ../shared/assets))
# `make bench`: a first table in about a minute (vit_tiny); `make bench FULL=1`: the vit_base
# table of the README (ToMe r=8/13/16 and EViT-style pruning, several minutes)
BENCH_ARGS ?= --model vit_tiny_patch16_224 --merge-r 0,8,16 --prune-keep 0.7 --batch-size 32 \
	--rounds 6 --iters 1
FULL_BENCH_ARGS ?= --model vit_base_patch16_224 --merge-r 0,8,13,16 --prune-keep 0.7,0.5 \
	--batch-size 32 --rounds 5 --iters 1

.PHONY: install bench test test-lowest lint clean

# the lowest supported versions (pyproject.toml's lower bounds), laid over .venv's torch
LOWEST ?= timm==1.0.26 open_clip_torch==2.32.0 transformers==5.23.0
LOWEST_TESTS ?= tests/test_upstream.py tests/test_adapters.py tests/test_hf_clip.py \
	tests/test_hf_bert.py tests/test_text_towers.py tests/test_llava_common.py tests/test_llava_fastv.py \
	tests/test_internvl.py
# every family's shared-tester cases at batch 1, its refusals, FastV and the drift check
LOWEST_SELECT ?= not realdata and (b1 or upstream or refusals or fastv)

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[all,dev,test-weights,caption]"
	touch $@

install: $(VENV)/.installed

bench: install
	$(VENV)/bin/vlprune bench $(if $(FULL),$(FULL_BENCH_ARGS),$(BENCH_ARGS))
	@$(if $(FULL),true,echo "Full run (vit_base, more settings, several minutes): make bench FULL=1;" \
		"any model / settings: $(VENV)/bin/vlprune bench --help")

test: install
	VLPRUNE_ASSETS=$(ASSETS) $(VENV)/bin/python -m pytest -q

# the adapters' tests again with the lowest supported timm / open_clip / transformers
test-lowest: install
	rm -rf .venv-low
	$(VENV)/bin/pip install -q --no-deps --target .venv-low $(LOWEST)
	PYTHONPATH=.venv-low $(VENV)/bin/python -c "import timm, transformers, importlib.metadata as m; print('lowest:', timm.__version__, m.version('open_clip_torch'), transformers.__version__)"
	PYTHONPATH=.venv-low VLPRUNE_ASSETS=$(ASSETS) $(VENV)/bin/python -m pytest -q -k "$(LOWEST_SELECT)" $(LOWEST_TESTS)

lint: install
	$(VENV)/bin/ruff check vlprune tests benchmarks

clean:
	rm -rf $(VENV) .venv-low .pytest_cache .ruff_cache results
