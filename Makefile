# finrecipe: `make setup`, `make test`, `make demo`, `make bench-*`, `make lint`.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
export VIRTUAL_ENV := $(abspath $(VENV))
export PATH := $(abspath $(VENV))/bin:$(PATH)

INSTALLED := $(VENV)/.installed
EXT_BUILT := $(VENV)/.ext-built
RUST_SRC := Cargo.toml $(shell find rust -name '*.rs' 2>/dev/null)

.PHONY: setup build test test-rust test-python lint fuzz demo parity parity-eval bench-merge bench-train bench-eval bench-recipe bench-search clean

setup: $(EXT_BUILT)

# First time: the venv, all dependencies and a release build of the extension (editable install).
$(INSTALLED): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@ $(EXT_BUILT)

# Later: rebuild the extension when the Rust sources change. The new library replaces the old one by
# rename, never by rewriting it in place (`maturin develop` truncates the file, which crashes any running
# finrecipe process that has it mapped: a long merge, a training run, another test job).
$(EXT_BUILT): $(INSTALLED) $(RUST_SRC)
	rm -rf target/ext-wheel
	$(VENV)/bin/maturin build --release --quiet --out target/ext-wheel
	$(PY) -c 'import glob, os, sys, zipfile; \
	  whl, = glob.glob("target/ext-wheel/*.whl"); z = zipfile.ZipFile(whl); \
	  so, = [n for n in z.namelist() if n.startswith("finrecipe/_core") and n.endswith(".so")]; \
	  dst = os.path.join("python", so); tmp = dst + ".new"; \
	  open(tmp, "wb").write(z.read(so)); os.chmod(tmp, 0o755); os.replace(tmp, dst)'
	$(PY) -m compileall -q python/finrecipe > /dev/null  # byte-compiled as an installed package is
	touch $@

build: $(EXT_BUILT)

test: setup lint test-rust test-python

test-rust:
	cargo test --quiet

# The property test of the safetensors header/index reader and the merge-plan parser
# (rust/tests/fuzz.rs): 1M generated inputs, zero panics. `cargo test` runs 50k of them.
FUZZ_CASES ?= 1000000
fuzz:
	FINRECIPE_FUZZ_CASES=$(FUZZ_CASES) cargo test --release --quiet --test fuzz -- --nocapture

test-python: setup
	$(PY) -m pytest -q tests

lint: setup
	$(VENV)/bin/ruff check python tests bench
	$(VENV)/bin/mypy
	cargo fmt --check
	cargo clippy --quiet --all-targets -- -D warnings

demo: setup
	$(VENV)/bin/finrecipe apply recipes/demo.yaml

# mergekit itself as the oracle (bench/parity/): a matrix of configs through mergekit 0.1.5 (its own
# venv, .venv-mergekit) and finrecipe, verdict per config, table in BENCHMARKS.md. Run it before
# every change to the merge core. PARITY_ARGS=--ci runs the CI-sized subset.
parity: setup
	$(PY) bench/parity/run.py $(PARITY_ARGS)

bench-merge: setup
	$(PY) bench/bench_merge.py

bench-train: setup
	$(PY) bench/bench_train.py

bench-eval: setup
	$(PY) bench/bench_eval.py

# jfin against the real japanese-lm-fin-harness on lm-evaluation-harness 0.4.9.1 (own venv .venv-lmeval)
parity-eval: setup
	$(PY) bench/parity_eval.py

bench-recipe: setup
	$(PY) bench/bench_recipe.py

bench-search: setup
	$(PY) bench/bench_search.py

clean:
	rm -rf target $(VENV) runs bench/out
