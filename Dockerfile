# syntax=docker/dockerfile:1.7
#
# resnet-serve images (BuildKit, Docker >= 23):
#
#   docker build -t resnet-serve:gpu .                               # CUDA runtime, resnet50
#   docker build -t resnet-serve:cpu --target runtime-cpu .          # CPU-only hosts
#   docker build --build-arg ARCHS="resnet18 resnet50" -t resnet-serve:gpu .
#   docker build --build-arg WEIGHTS=checkpoints/resnet50.pth -t resnet-serve:gpu .
#
# Stages:
#   builder      Python + CPU torch: exports and verifies the ONNX models into /models,
#                and packs the service and the client SDK into wheels
#   runtime-cpu  Python slim + onnxruntime (CPU) + server + client, no torch
#   runtime      CUDA runtime + cuDNN + onnxruntime-gpu + server + client, no torch
#
# onnxruntime-gpu 1.31.1 from PyPI is built for CUDA 13.0 and cuDNN 9
# (onnxruntime/capi/build_and_package_info.py; its CUDA provider links
# libcudart.so.13 and libcublas.so.13), hence the CUDA 13.0 base below. Such an
# image needs an NVIDIA driver >= 580 on the host.

ARG PYTHON_IMAGE=python:3.12.12-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:13.0.2-cudnn-runtime-ubuntu24.04
ARG ORT_VERSION=1.31.1
# Where the builder stage writes the repository and the runtime stages find it to copy.
ARG MODEL_REPO=/models


# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

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
ARG TORCH_VERSION=2.13.0
ARG MODEL_REPO

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

WORKDIR /src

# The CPU build of torch: the default wheel from PyPI pulls several GB of CUDA libraries.
RUN pip install --index-url https://download.pytorch.org/whl/cpu "torch==${TORCH_VERSION}"

COPY pyproject.toml README.md ./
COPY clients/python/ clients/python/
COPY builder/ builder/
COPY server/ server/

# Install the builder; pack the service and the SDK as wheels for the runtime stages.
# Local projects: their dependency ranges live in the two pyproject.toml files.
# hadolint ignore=DL3013
RUN pip install ./clients/python ".[builder,cpu]" \
    && pip wheel --no-deps --wheel-dir /wheels ./clients/python .

# Export and verify. The build context is mounted (not copied) so that a checkpoint
# reaches this step without ending up in any image layer.
RUN --mount=type=bind,source=.,target=/context \
    set -eu; \
    for arch in ${ARCHS}; do \
        resnet-serve build "${arch}" --repo "${MODEL_REPO}" --input "${INPUT}" \
            --precision "${PRECISION}" \
            ${WEIGHTS:+--weights "/context/${WEIGHTS}"} \
            ${CALIBRATION:+--calibration "/context/${CALIBRATION}"}; \
    done; \
    resnet-serve models --repo "${MODEL_REPO}"


# ---------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime-cpu

LABEL org.opencontainers.image.title="resnet-serve (CPU)" \
      org.opencontainers.image.description="ResNet classification over gRPC: ONNX Runtime, dynamic batching, Prometheus metrics" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG ORT_VERSION
ARG MODEL_REPO

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# The service's wheel names no ONNX Runtime (its cpu and gpu extras do); a CPU-only
# image takes the CPU build (a tenth of the GPU wheel's size).
RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python -m venv /opt/venv \
    && pip install /wheels/*.whl "onnxruntime==${ORT_VERSION}" \
    && python -c "import onnxruntime, server.serve, resnet_serve_client"

COPY --from=builder ${MODEL_REPO} /models

RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin resnet
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
# Shell form on purpose, so the probe follows RESNET_SERVE_PORT; a probe gets no signals.
# hadolint ignore=DL3025
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD resnet-serve-client health --server "127.0.0.1:${RESNET_SERVE_PORT}" --timeout 3
ENTRYPOINT ["resnet-serve", "serve"]


# ---------------------------------------------------------------------------
FROM ${CUDA_IMAGE} AS runtime

LABEL org.opencontainers.image.title="resnet-serve (CUDA)" \
      org.opencontainers.image.description="ResNet classification over gRPC: ONNX Runtime, dynamic batching, Prometheus metrics" \
      org.opencontainers.image.licenses="Apache-2.0"

ARG ORT_VERSION
ARG MODEL_REPO

ENV VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1

# Python from the base image's Ubuntu release (24.04: 3.12). Package versions are
# fixed by that release and the pinned base tag; pinning them here as well would
# break the build on every Ubuntu security update.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*

RUN --mount=type=bind,from=builder,source=/wheels,target=/wheels \
    python3 -m venv /opt/venv \
    && pip install /wheels/*.whl "onnxruntime-gpu==${ORT_VERSION}" \
    && python -c "import onnxruntime, server.serve, resnet_serve_client"

COPY --from=builder ${MODEL_REPO} /models

RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin resnet
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
# Shell form on purpose, so the probe follows RESNET_SERVE_PORT; a probe gets no signals.
# hadolint ignore=DL3025
HEALTHCHECK --interval=10s --timeout=5s --start-period=120s --retries=3 \
    CMD resnet-serve-client health --server "127.0.0.1:${RESNET_SERVE_PORT}" --timeout 3
ENTRYPOINT ["resnet-serve", "serve"]
