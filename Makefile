# Developer commands; `make help` lists them.
PY ?= .venv/bin/python

.PHONY: help venv develop test rust-test lint import-graph fmt bench demo ci asan miri fork-test fuzz \
	fuzz-python hf-conformance time-exact time-fast time-fast-backward time-kernel

help:  ## list the developer commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-18s %s\n", $$1, $$2}'

venv:  ## create .venv with the test and dev dependencies
	python3 -m venv .venv && $(PY) -m pip install -q -U pip && $(PY) -m pip install -q -e '.[dev]'

develop:  ## rebuild the extension in place (release)
	$(PY) -m maturin develop --release

test:  ## Rust unit tests and the Python tests
	cargo test --lib && $(PY) -m pytest

rust-test:  ## Rust unit tests only (no Python needed)
	cargo test --lib

lint:  ## rustfmt, clippy, ruff and the Python import-cycle check
	cargo fmt --all -- --check && cargo clippy --lib --features python -- -D warnings -D clippy::undocumented_unsafe_blocks && $(PY) -m ruff check python tests benchmarks tools && $(PY) tools/py_import_graph.py && $(PY) tools/module_graph.py > /dev/null

modules:  ## the crate's module graph; fails on an import cycle
	$(PY) tools/module_graph.py

import-graph:  ## fail on an import cycle among python/fastrope's modules (--print: the graph)
	$(PY) tools/py_import_graph.py

fmt:  ## format Rust and Python
	cargo fmt --all && $(PY) -m ruff check --fix python tests benchmarks

demo:  ## the README's demo
	$(PY) -m fastrope demo

bench:  ## the exact-method benchmark (see benchmarks/README.md)
	$(PY) benchmarks/bench_exact.py

# The #[ignore]d Rust timing harnesses (release build, output shown). Sizes of the fast ones from
# FASTROPE_TIMING_N (e.g. 4096,65536) and FASTROPE_TIMING_D (e.g. 2,4); time-exact takes
# FASTROPE_TIMING_ISA to time one instruction set.
TIMING = cargo test --release --lib
time-exact:  ## exact forward+backward throughput per instruction set (Rust timing harness)
	$(TIMING) timing_rotary_f32 -- --ignored --nocapture

time-fast:  ## fast-method forward timing of one head (FASTROPE_TIMING_N, FASTROPE_TIMING_D)
	$(TIMING) timing_one_head -- --ignored --nocapture

time-fast-backward:  ## fast-method backward timing of one head (FASTROPE_TIMING_N, _D)
	$(TIMING) timing_backward_one_head -- --ignored --nocapture

time-kernel:  ## exact micro-kernel peak GFLOP/s on L1-resident operands
	$(TIMING) micro_kernel_peak -- --ignored --nocapture

fork-test:  ## the fork, fault and thread tests (each scenario under a timeout)
	$(PY) -m pytest -q tests/test_fork.py tests/test_faults.py tests/test_concurrency.py

# The sanitizers need nightly. -Zbuild-std (the rust-src component) instruments std too; set
# ASAN_CARGO_FLAGS= (empty) to instrument only this crate and its dependencies.
ASAN_CARGO_FLAGS ?= -Zbuild-std
asan:  ## Rust unit tests under AddressSanitizer (nightly; target/asan)
	RUSTFLAGS=-Zsanitizer=address ASAN_OPTIONS=detect_leaks=0 CARGO_TARGET_DIR=target/asan \
		cargo +nightly test --lib --target x86_64-unknown-linux-gnu $(ASAN_CARGO_FLAGS)

# Miri runs the portable instruction-set paths (FASTROPE_BASELINE; no inline asm, no AVX) of
# the unit tests whose names match each filter in MIRI_TESTS, one run per filter (small sizes:
# Miri is ~1000x slower; the exact::tests::miri module holds calls sized for it). Flags: float
# results deterministic (the tests compare against std's exp/sin, which Miri otherwise perturbs
# by a few ulp), Tree Borrows (rayon's crossbeam-epoch breaks Stacked Borrows' rules, a known
# upstream issue), and rayon's pool threads outliving a test are not reported as leaks.
MIRI_TESTS ?= arch:: exact::kernel::tests exact::rotate::tests exact::sparse::tests \
	exact::tests::miri fast::cache
MIRIFLAGS_ALL ?= -Zmiri-env-forward=FASTROPE_BASELINE -Zmiri-deterministic-floats \
	-Zmiri-tree-borrows -Zmiri-ignore-leaks
miri:  ## portable-path unit tests under Miri (nightly with the miri component)
	for t in $(MIRI_TESTS); do \
		FASTROPE_BASELINE=1 MIRIFLAGS="$(MIRIFLAGS_ALL)" cargo +nightly miri test --lib $$t || exit 1; \
	done

# Coverage-guided fuzzing (cargo-fuzz, nightly, AddressSanitizer) of the Rust entry points; the
# fuzz/ crate is outside the main build. FUZZ_SECONDS per target; corpora in fuzz/corpus, crash
# inputs kept as regressions in fuzz/regressions (replayed first).
FUZZ_SECONDS ?= 300
FUZZ_TARGETS ?= validate exact fast
fuzz:  ## fuzz each target for FUZZ_SECONDS (cargo install cargo-fuzz; nightly)
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		if ls regressions/$$t/* >/dev/null 2>&1; then cargo +nightly fuzz run $$t regressions/$$t/* || exit 1; fi; \
		cargo +nightly fuzz run $$t -- -max_total_time=$(FUZZ_SECONDS) || exit 1; done

# The hypothesis property tests at a fuzzing budget (the `fuzz` profile of tests/conftest.py:
# FUZZ_EXAMPLES examples per test, no deadline); the default test run keeps the `ci` profile.
FUZZ_EXAMPLES ?= 2000
fuzz-python:  ## hypothesis property tests at FUZZ_EXAMPLES examples each (not in `make test`)
	HYPOTHESIS_PROFILE=fuzz FASTROPE_FUZZ_EXAMPLES=$(FUZZ_EXAMPLES) $(PY) -m pytest -q \
		tests/test_properties.py tests/test_robustness.py -k "matches_reference or any_input"

ci:  ## what CI runs, from a fresh virtualenv
	bash .ci/run

hf-conformance:  ## transformers' Llama tests with fastrope as the attention (TRANSFORMERS_SRC=checkout)
	$(PY) tools/hf_conformance.py $(TRANSFORMERS_SRC)
