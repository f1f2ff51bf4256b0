# Developer commands; `make help` lists them.
PY ?= .venv/bin/python

.PHONY: help venv develop test rust-test lint fmt bench demo ci hf-conformance

help:  ## list the developer commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

venv:  ## create .venv with the test and dev dependencies
	python3 -m venv .venv && $(PY) -m pip install -q -U pip && $(PY) -m pip install -q -e '.[dev]'

develop:  ## rebuild the extension in place (release)
	$(PY) -m maturin develop --release

test:  ## Rust unit tests and the Python tests
	cargo test --lib && $(PY) -m pytest

rust-test:  ## Rust unit tests only (no Python needed)
	cargo test --lib

lint:  ## rustfmt, clippy and ruff
	cargo fmt --all -- --check && cargo clippy --lib --features python -- -D warnings && $(PY) -m ruff check python tests benchmarks tools

fmt:  ## format Rust and Python
	cargo fmt --all && $(PY) -m ruff check --fix python tests benchmarks

demo:  ## the README's demo
	$(PY) -m fastrope demo

bench:  ## the exact-method benchmark (see benchmarks/README.md)
	$(PY) benchmarks/bench_exact.py

ci:  ## what CI runs, from a fresh virtualenv
	bash .ci/run

hf-conformance:  ## transformers' Llama tests with fastrope as the attention (TRANSFORMERS_SRC=checkout)
	$(PY) tools/hf_conformance.py $(TRANSFORMERS_SRC)
