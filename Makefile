# Two commands on a fresh machine: `make bench` (the main job, no downloads) and `make test`.
# Both create .venv and install the package with all extras on first use.

PYTHON ?= python3
VENV ?= .venv
ASSETS ?= $(if $(VLPRUNE_ASSETS),$(VLPRUNE_ASSETS),$(wildcard ../shared/assets))
BENCH_ARGS ?= --model vit_base_patch16_224 --merge-r 0,8,16 --batch-size 32 --rounds 3 --iters 1

.PHONY: install bench test lint clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install -q --upgrade pip
	$(VENV)/bin/pip install -q -e ".[all,dev,test-weights,caption]"
	touch $@

install: $(VENV)/.installed

bench: install
	$(VENV)/bin/vlprune bench $(BENCH_ARGS)

test: install
	VLPRUNE_ASSETS=$(ASSETS) $(VENV)/bin/python -m pytest -q

lint: install
	$(VENV)/bin/ruff check vlprune tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache results
