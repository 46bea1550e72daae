# The two commands a fresh machine needs: `make run` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
REPO   ?= models
MODEL  ?= resnet50

# Every environment installs the versions requirements/constraints.txt pins (pip-compile's
# lock of all extras); `make lock` moves them forward (requirements/README.md).
LOCK   := requirements/constraints.txt

.PHONY: venv run test lint protos bench clean deps-system gpu-check images lock

$(STAMP): pyproject.toml clients/python/pyproject.toml $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet -c $(LOCK) --upgrade pip
	$(BIN)/python -m pip uninstall --quiet --yes onnxruntime-gpu 2>/dev/null || true
	$(BIN)/python -m pip install --quiet -c $(LOCK) -e ./clients/python -e '.[cpu,builder,dev]'
	# perf_analyzer (C++) left the tritonclient wheel after 2.49 (2.49's writes an empty profile
	# export, 2.52+ need glibc 2.38): 2.41's binary, apart from the venv's current tritonclient.
	$(BIN)/python -m pip install --quiet --no-deps --target $(VENV)/perf-analyzer 'tritonclient==2.41.0'
	touch $@

venv: $(STAMP)

# Built once; later runs reuse it.
$(REPO)/$(MODEL)/1/model.onnx: | $(STAMP)
	$(BIN)/resnet-serve build $(MODEL) --repo $(REPO)

run: $(STAMP) $(REPO)/$(MODEL)/1/model.onnx
	$(BIN)/resnet-serve serve --repo $(REPO)

lint: $(STAMP)
	$(BIN)/ruff check .

test: $(STAMP) lint deps-system
	$(BIN)/pytest

# System packages: nginx for the load-balancer tests (tests/deploy); libb64 for
# perf_analyzer, Triton's C++ load generator that the bench runs (and its smoke test);
# Debian's docker.io (its client has BuildKit built in) and debootstrap for `make images`
# and the container tests; Debian's prometheus (the server and promtool) for the rules'
# unit tests and the scrape test (tests/deploy). Installed from Debian/Ubuntu when absent
# and we are root; a no-op when present.
deps-system:
	@missing=""; \
	command -v nginx >/dev/null 2>&1 || missing="$$missing nginx-light"; \
	dpkg -s libb64-0d >/dev/null 2>&1 || missing="$$missing libb64-0d"; \
	dpkg -s docker.io >/dev/null 2>&1 || missing="$$missing docker.io"; \
	command -v debootstrap >/dev/null 2>&1 || [ -x /usr/sbin/debootstrap ] || missing="$$missing debootstrap"; \
	command -v promtool >/dev/null 2>&1 && command -v prometheus >/dev/null 2>&1 || missing="$$missing prometheus"; \
	[ -z "$$missing" ] || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; } || \
		echo "note: missing$$missing (as root: apt-get install$$missing); the nginx, Prometheus and container tests skip, the bench leaves perf_analyzer out" >&2

# The CPU and GPU images, built with no registry: a private dockerd (as root) when none
# answers, a debootstrapped Debian base, the wheelhouse (deploy/images.py says how).
images: deps-system
	$(PYTHON) deploy/images.py build

# Raw ONNX Runtime against the server, side by side in one run (models built into
# bench/results/tmp/ on first use): JSON in bench/results/, report in docs/benchmarks.md.
bench: $(STAMP) deps-system
	$(BIN)/python -m bench run

# The acceptance run on an NVIDIA GPU (bench/gpu_check.py): its own venv with the gpu extra
# (CUDA, cuDNN and cuBLAS wheels; only the driver comes from the host) and perf_analyzer (the
# front-end sweep's load; libb64-0d installed as root when absent), then builds, serves with
# --device cuda, checks, measures, runs the front-end sweep (1, 2, 4, 8 front ends) and the
# engine alone (python -m bench engine). Exit
# 2 without a GPU. DEVICE=cpu: the small dry run the test suite runs, in the ordinary venv.
DEVICE ?= cuda
GPU_VENV := .venv-gpu
# torch (the builder's) from PyTorch's CPU index, as the image takes it: PyPI's build of the
# same version needs CUDA wheels other than the ones the lock pins for onnxruntime-gpu
TORCH_INDEX_URL ?= https://download.pytorch.org/whl/cpu
gpu-check:
ifeq ($(DEVICE),cpu)
	$(MAKE) venv
	$(BIN)/python -m bench gpu_check --device cpu
else
	test -x $(GPU_VENV)/bin/python || $(PYTHON) -m venv $(GPU_VENV)
	$(GPU_VENV)/bin/python -m pip install --quiet -c $(LOCK) --upgrade pip
	PIP_EXTRA_INDEX_URL="$${PIP_EXTRA_INDEX_URL:-} $(TORCH_INDEX_URL)" \
		$(GPU_VENV)/bin/python -m pip install --quiet -c $(LOCK) -e ./clients/python -e '.[gpu,builder,dev]'
	test -x $(GPU_VENV)/perf-analyzer/bin/perf_analyzer || \
		$(GPU_VENV)/bin/python -m pip install --quiet --no-deps --target $(GPU_VENV)/perf-analyzer 'tritonclient==2.41.0'
	@dpkg -s libb64-0d >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends libb64-0d; } || \
		echo "note: no libb64-0d: the front-end sweep's load comes from the SDK instead of perf_analyzer" >&2
	$(GPU_VENV)/bin/python -m bench gpu_check --device $(DEVICE)
endif

# Re-resolve the lock from pyproject.toml's ranges: every package to its newest release
# (UPGRADE=grpcio: that package only; UPGRADE=: none, only what the ranges now demand).
UPGRADE ?= all
lock: $(STAMP)
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
		--annotation-style line --unsafe-package torch --unsafe-package resnet-serve \
		--unsafe-package resnet-serve-client --unsafe-package setuptools \
		$(if $(filter all,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p))) \
		--output-file $(LOCK) requirements/constraints.in
	$(BIN)/pip-compile --quiet --strip-extras --no-emit-index-url --no-emit-find-links \
		--annotation-style line \
		$(if $(filter all,$(UPGRADE)),--upgrade,$(foreach p,$(UPGRADE),--upgrade-package $(p))) \
		--output-file requirements/kserve.txt requirements/kserve.in

protos: $(STAMP)
	$(BIN)/python protos/generate.py

# The tables that copy code (README's flags and metrics, docs/deploy.md's metrics), rewritten
# from server.config.Settings and server.metrics (docs/reference.py); a test fails on drift.
.PHONY: docs
docs: $(STAMP)
	$(BIN)/python -m docs.reference

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
