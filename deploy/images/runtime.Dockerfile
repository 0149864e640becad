# syntax=docker/dockerfile:1
# The pod runtime image (engine.type: builtin): `pd-runtime` with torch, NIXL (UCX transport)
# and the Triton KV gather/scatter kernels, i.e. pd-operator[runtime].
#
# Not built in this repository's development sandbox (no Docker daemon, no GPU); build it on a
# machine with Docker from the repository root:
#   docker build -f deploy/images/runtime.Dockerfile -t ghcr.io/pd-operator/pd-runtime:0.1.0 .
# The CUDA major version of the base image, of the torch wheel index and of the NIXL wheel must
# agree: change CUDA_IMAGE and TORCH_INDEX together (nixl installs both nixl-cu12 and
# nixl-cu13 and loads the one matching torch's CUDA at import).

ARG CUDA_IMAGE=nvidia/cuda:12.9.1-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX=https://download.pytorch.org/whl/cu129
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# python3 (3.12 on Ubuntu 24.04; the project needs >= 3.11). Triton compiles its small launcher
# with the host C compiler and Python headers at first use, hence gcc and python3-dev.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/pd-runtime
ENV PATH=/opt/pd-runtime/bin:$PATH
# torch first, from the CUDA-specific index, so `pip install .[runtime]` keeps it.
RUN pip install --index-url "${TORCH_INDEX}" "torch>=2.4"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY runtime/ runtime/
RUN pip install ".[runtime]" \
 && python -c "import torch, nixl, pd_runtime.cli, pd_runtime.transport" \
 && rm -rf /src
WORKDIR /

# Non-root; Triton's kernel cache goes to a writable place.
RUN groupadd --gid 65532 pd \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp pd
ENV HOME=/tmp TRITON_CACHE_DIR=/tmp/triton PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["pd-runtime"]
