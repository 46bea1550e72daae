# resnet-serve images (BuildKit: Docker >= 20.10 with DOCKER_BUILDKIT=1, or buildx):
#
#   docker build -t resnet-serve:gpu .                               # CUDA, resnet50
#   docker build -t resnet-serve:cpu --target runtime-cpu .          # CPU-only hosts
#   docker build --build-arg ARCHS="resnet18 resnet50" -t resnet-serve:gpu .
#   docker build --build-arg WEIGHTS=checkpoints/resnet50.pth -t resnet-serve:gpu .
#   docker build --build-arg PIP_NO_INDEX=1 ...                       # offline: wheelhouse/ only
#
# `make images` builds both with no registry at all (deploy/images.py: a debootstrapped
# base image, the wheelhouse filled on the host); docs/deploy.md says how.
#
# Stages:
#   builder      Python + CPU torch: exports and verifies the ONNX models into /models,
#                and packs the service and the client SDK into wheels
#   runtime-cpu  Python + onnxruntime (CPU) + server + client, no torch
#   runtime      Python + onnxruntime-gpu + the CUDA and cuDNN libraries from NVIDIA's
#                wheels + server + client, no torch; the host brings the driver
#
# Packages come from pip's index (PyPI, or PIP_INDEX_URL / PIP_EXTRA_INDEX_URL given as
# build args) and from wheelhouse/ in the build context (empty in a clone; see its
# README). PIP_NO_INDEX=1 installs from wheelhouse/ alone, as an air-gapped build must.
#
# onnxruntime-gpu 1.31.1 from PyPI is built for CUDA 13.0 and cuDNN 9
# (onnxruntime/capi/build_and_package_info.py); its CUDA provider links
# libcudart.so.13, libcublas.so.13, libcublasLt.so.13 and libcurand.so.10, and loads
# cuDNN 9: its `cuda` and `cudnn` extras plus cuBLAS bring them all. Such an image
# needs an NVIDIA driver >= 580 on the host.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG ORT_VERSION=1.31.1
ARG CUDA_MAJOR=13
# Where the builder stage writes the repository and the runtime stages find it to copy.
ARG MODEL_REPO=/models


# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ARG TORCH_VERSION=2.13.0
# PyTorch's index of CPU builds: the default torch wheel on PyPI pulls several GB of
# CUDA libraries. Empty: pip's own index and wheelhouse/ only (a CPU torch put there).
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
# pip's settings, when given (as environment variables, pip reads them itself).
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_NO_INDEX

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src

RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    python3 -m venv /opt/venv \
    && PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL:-} ${TORCH_INDEX_URL}" \
        pip install --find-links /wheelhouse "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY clients/python/ clients/python/
COPY builder/ builder/
COPY server/ server/

# Install the builder; pack the service and the SDK as wheels for the runtime stages.
# Local projects: their dependency ranges live in the two pyproject.toml files.
# hadolint ignore=DL3013
RUN --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    pip install --find-links /wheelhouse ./clients/python ".[builder,cpu]" \
    && pip wheel --find-links /wheelhouse --no-deps --wheel-dir /wheels ./clients/python .

# Declared here, after the installs, so that other models reuse the layers above.
# Space-separated architecture names for `resnet-serve build` (resnet50, resnet18, resnet20, ...).
ARG ARCHS=resnet50
# Optional torchvision-format checkpoint (.pth or .safetensors), a path inside the
# build context; it is applied to every architecture in ARCHS, so give one at a time.
ARG WEIGHTS=
# Graph input: float32 (NCHW, normalized by the server) or uint8 (NHWC, normalized in the graph).
ARG INPUT=float32
# Weights and compute: fp32, fp16 or int8 (static quantization). For int8, CALIBRATION
# names a folder of representative images inside the build context; without it the
# builder calibrates on synthetic data and records a warning.
ARG PRECISION=fp32
ARG CALIBRATION=
ARG MODEL_REPO

# Export and verify. The build context is mounted (not copied) so that a checkpoint
# reaches this step without ending up in any image layer. ARCHS empty: no model in the
# image, for a repository mounted at run time (KServe's storageUri at /mnt/models).
# The builder writes config.json and labels.txt through mkstemp (mode 0600): readable
# by all, so the runtime's user 10001 can load them.
RUN --mount=type=bind,source=.,target=/context \
    set -eu; \
    mkdir -p "${MODEL_REPO}"; \
    for arch in ${ARCHS}; do \
        resnet-serve build "${arch}" --repo "${MODEL_REPO}" --input "${INPUT}" \
            --precision "${PRECISION}" \
            ${WEIGHTS:+--weights "/context/${WEIGHTS}"} \
            ${CALIBRATION:+--calibration "/context/${CALIBRATION}"}; \
    done; \
    chmod -R a+rX "${MODEL_REPO}"; \
    resnet-serve models --repo "${MODEL_REPO}"


# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-cpu

LABEL org.opencontainers.image.title="resnet-serve (CPU)" \
      org.opencontainers.image.description="ResNet classification over gRPC: ONNX Runtime, dynamic batching, Prometheus metrics" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG ORT_VERSION
ARG MODEL_REPO
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_NO_INDEX

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The service's wheel names no ONNX Runtime (its cpu and gpu extras do); a CPU-only
# image takes the CPU build (a tenth of the GPU wheel's size).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    python3 -m venv /opt/venv \
    && pip install --find-links /wheelhouse /wheels/*.whl "onnxruntime==${ORT_VERSION}" \
    && python -c "import onnxruntime, server.serve, resnet_serve_client" \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin resnet

COPY --from=builder ${MODEL_REPO} /models

USER 10001:10001

# Every server setting is also a RESNET_SERVE_* variable (`resnet-serve serve --help`).
ENV RESNET_SERVE_REPO=/models \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_HTTP_PORT=8000 \
    RESNET_SERVE_PORT=8001 \
    RESNET_SERVE_METRICS_PORT=8002 \
    RESNET_SERVE_DEVICE=cpu \
    RESNET_SERVE_GRACE_PERIOD=30 \
    RESNET_SERVE_LOG_FORMAT=json

EXPOSE 8000 8001 8002
STOPSIGNAL SIGTERM
# One grpc.health.v1 Check from a module that imports grpc and the health stubs only.
# Shell form on purpose, so the probe follows RESNET_SERVE_PORT; a probe gets no signals.
# hadolint ignore=DL3025
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD python -m server.healthcheck "127.0.0.1:${RESNET_SERVE_PORT}" --timeout 3
# Exec form: `resnet-serve serve` is PID 1 and gets SIGTERM itself. With front ends
# (RESNET_SERVE_FRONTENDS) it is the engine (rs-engine); it starts them as its children
# (rs-frontend-<i>: `python -m server.frontend` from this venv, nothing fetched at run time),
# and on SIGTERM drains them, reaps them and exits. Their segments live in /dev/shm: give
# the container (front ends + 1) x RESNET_SERVE_FRONTEND_SHM_BYTES of it (docs/deploy.md).
ENTRYPOINT ["resnet-serve", "serve"]


# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="resnet-serve (CUDA)" \
      org.opencontainers.image.description="ResNet classification over gRPC: ONNX Runtime, dynamic batching, Prometheus metrics" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG ORT_VERSION
ARG CUDA_MAJOR
ARG MODEL_REPO
ARG PIP_INDEX_URL
ARG PIP_EXTRA_INDEX_URL
ARG PIP_NO_INDEX

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# CUDA user space from NVIDIA's wheels, the service's `gpu` extra pinned to ORT_VERSION:
# the provider links cuBLAS, which onnxruntime-gpu's `cuda` extra does not name. The wheels' lib folders go into the loader's path (ld.so.conf),
# so the provider and the cuDNN it loads resolve in any process, whatever its env.
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    --mount=type=bind,source=wheelhouse,target=/wheelhouse \
    python3 -m venv /opt/venv \
    && pip install --find-links /wheelhouse /wheels/*.whl \
        "onnxruntime-gpu[cuda,cudnn]==${ORT_VERSION}" "nvidia-cublas~=${CUDA_MAJOR}.0" \
    && python -c "import onnxruntime, server.serve, resnet_serve_client" \
    && find /opt/venv/lib -type d -name lib -path '*/site-packages/nvidia/*' \
        > /etc/ld.so.conf.d/resnet-serve-cuda.conf \
    && ldconfig \
    && useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin resnet

COPY --from=builder ${MODEL_REPO} /models

USER 10001:10001

# Every server setting is also a RESNET_SERVE_* variable (`resnet-serve serve --help`).
# device auto: CUDA when a session really comes up on it (a GPU is passed in), else CPU.
ENV RESNET_SERVE_REPO=/models \
    RESNET_SERVE_HOST=0.0.0.0 \
    RESNET_SERVE_HTTP_PORT=8000 \
    RESNET_SERVE_PORT=8001 \
    RESNET_SERVE_METRICS_PORT=8002 \
    RESNET_SERVE_DEVICE=auto \
    RESNET_SERVE_GRACE_PERIOD=30 \
    RESNET_SERVE_LOG_FORMAT=json \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility

EXPOSE 8000 8001 8002
STOPSIGNAL SIGTERM
# One grpc.health.v1 Check from a module that imports grpc and the health stubs only.
# Shell form on purpose, so the probe follows RESNET_SERVE_PORT; a probe gets no signals.
# hadolint ignore=DL3025
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD python -m server.healthcheck "127.0.0.1:${RESNET_SERVE_PORT}" --timeout 3
# Exec form: `resnet-serve serve` is PID 1 and gets SIGTERM itself. With front ends
# (RESNET_SERVE_FRONTENDS) it is the engine (rs-engine); it starts them as its children
# (rs-frontend-<i>: `python -m server.frontend` from this venv, nothing fetched at run time),
# and on SIGTERM drains them, reaps them and exits. Their segments live in /dev/shm: give
# the container (front ends + 1) x RESNET_SERVE_FRONTEND_SHM_BYTES of it (docs/deploy.md).
ENTRYPOINT ["resnet-serve", "serve"]
