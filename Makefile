# Developer commands; `make help` lists them.
PY ?= .venv/bin/python

.PHONY: help venv develop test rust-test lint fmt bench demo ci asan miri fork-test hf-conformance

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

fork-test:  ## the fork, fault and thread tests (each scenario under a timeout)
	$(PY) -m pytest -q tests/test_fork.py tests/test_faults.py tests/test_concurrency.py

# The sanitizers need nightly. Without the rust-src component std itself is not instrumented
# (only this crate and its dependencies); with it, add -Zbuild-std to ASAN_CARGO_FLAGS.
ASAN_CARGO_FLAGS ?=
asan:  ## Rust unit tests under AddressSanitizer (nightly; target/asan)
	RUSTFLAGS=-Zsanitizer=address ASAN_OPTIONS=detect_leaks=0 CARGO_TARGET_DIR=target/asan \
		cargo +nightly test --lib --target x86_64-unknown-linux-gnu $(ASAN_CARGO_FLAGS)

# Miri runs the portable instruction-set paths (FASTROPE_BASELINE; no inline asm, no AVX) of
# the unit tests whose names match MIRI_TESTS (small sizes: Miri is ~1000x slower).
MIRI_TESTS ?= cache
miri:  ## portable-path unit tests under Miri (nightly with the miri component)
	FASTROPE_BASELINE=1 MIRIFLAGS="-Zmiri-env-forward=FASTROPE_BASELINE" \
		cargo +nightly miri test --lib $(MIRI_TESTS)

ci:  ## what CI runs, from a fresh virtualenv
	bash .ci/run

hf-conformance:  ## transformers' Llama tests with fastrope as the attention (TRANSFORMERS_SRC=checkout)
	$(PY) tools/hf_conformance.py $(TRANSFORMERS_SRC)
