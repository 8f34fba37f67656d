# syntax=docker/dockerfile:1
#
# Images for dcl-embed, one per build target:
#   serve-cpu  the HTTP API on ONNX Runtime (CPU) and FAISS; torch is not installed
#   serve-gpu  the same API on ONNX Runtime's CUDA execution provider
#   train      torch and torchvision, for `dcl train` and `dcl export`
#
#   docker build --target serve-cpu -t dcl-embed:serve-cpu .
#   docker build --target serve-gpu -t dcl-embed:serve-gpu .
#   docker build --target train -t dcl-embed:train .
#
# Every target installs through deploy/install.sh, which tests/deploy also runs.
# The serving images keep the model bundle on /models and the item store on /data,
# take their settings from DCL_* environment variables, and run with a read-only
# root filesystem when /tmp is a tmpfs (docs/deploy.md).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
# NOTE: the CUDA and cuDNN major versions must match the onnxruntime-gpu wheel
# pinned in deploy/constraints.txt (ONNX Runtime's CUDA execution provider page
# lists the pairs). This default has not been built or run on a GPU here.
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-runtime-ubuntu22.04

# The project files that deploy/install.sh installs, in one layer for all builders.
FROM scratch AS source
COPY pyproject.toml README.md /src/
COPY dcl_embed /src/dcl_embed
COPY service /src/service
COPY training /src/training
COPY deploy/install.sh deploy/constraints.txt /src/deploy/

FROM ${PYTHON_IMAGE} AS python-base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN groupadd --system --gid 10001 dcl \
    && useradd --system --uid 10001 --gid dcl --create-home --home-dir /home/dcl \
        --shell /usr/sbin/nologin dcl \
    && mkdir -p /models /data /runs \
    && chown dcl:dcl /models /data /runs

FROM ${CUDA_IMAGE} AS cuda-base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# Ubuntu 22.04 ships Python 3.11 as python3.11 next to its default python3 (3.10).
# Versions come from the base image's release, so they are not pinned one by one.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --system --gid 10001 dcl \
    && useradd --system --uid 10001 --gid dcl --create-home --home-dir /home/dcl \
        --shell /usr/sbin/nologin dcl \
    && mkdir -p /models /data /runs \
    && chown dcl:dcl /models /data /runs

FROM python-base AS build-serve-cpu
COPY --from=source /src /src
RUN PIP_NO_CACHE_DIR=1 /src/deploy/install.sh serve-cpu /opt/venv

FROM cuda-base AS build-serve-gpu
COPY --from=source /src /src
RUN PIP_NO_CACHE_DIR=1 /src/deploy/install.sh serve-gpu /opt/venv

FROM python-base AS build-train
# An extra package index for torch and torchvision, for example the PyTorch CPU
# wheel index for an image without CUDA libraries. Empty: PyPI's default wheels.
ARG TORCH_INDEX_URL=""
COPY --from=source /src /src
RUN PIP_NO_CACHE_DIR=1 TORCH_INDEX_URL="${TORCH_INDEX_URL}" \
    /src/deploy/install.sh train /opt/venv

FROM python-base AS serve-cpu
COPY --from=build-serve-cpu /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/dcl/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    DCL_HOST=0.0.0.0 \
    DCL_PORT=8000 \
    DCL_BUNDLE_DIR=/models \
    DCL_DATA_DIR=/data
USER 10001:10001
WORKDIR /home/dcl
VOLUME ["/models", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/dcl/healthcheck.py"]
ENTRYPOINT ["dcl"]
CMD ["serve"]

FROM cuda-base AS serve-gpu
COPY --from=build-serve-gpu /opt/venv /opt/venv
COPY deploy/healthcheck.py /opt/dcl/healthcheck.py
ENV PATH=/opt/venv/bin:$PATH \
    DCL_HOST=0.0.0.0 \
    DCL_PORT=8000 \
    DCL_BUNDLE_DIR=/models \
    DCL_DATA_DIR=/data
USER 10001:10001
WORKDIR /home/dcl
VOLUME ["/models", "/data"]
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "/opt/dcl/healthcheck.py"]
ENTRYPOINT ["dcl"]
CMD ["serve"]

FROM python-base AS train
COPY --from=build-train /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    DCL_BUNDLE_DIR=/models \
    DCL_DATA_DIR=/data
USER 10001:10001
WORKDIR /runs
VOLUME ["/models", "/runs"]
ENTRYPOINT ["dcl"]
CMD ["--help"]

# The last stage is the default target: the CPU serving image.
FROM serve-cpu
