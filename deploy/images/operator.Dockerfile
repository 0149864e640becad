# syntax=docker/dockerfile:1
# The operator image (ghcr.io/pd-operator/pd-operator, the chart's default image): `pdctl`
# with the webhook, kopf, the Kubernetes client, pydantic and pd_runtime.compat. The base
# dependencies of pyproject.toml only: no torch, no nixl (the `runtime` extra is not installed),
# so the image stays small and starts fast.
#
# Not built in this repository's development sandbox (it has no Docker daemon); the chart tests
# render it and run the operator from the source tree instead. Build from the repository root:
#   docker build -f deploy/images/operator.Dockerfile -t ghcr.io/pd-operator/pd-operator:0.1.0 .
# operator.Dockerfile.dockerignore (BuildKit reads it) keeps .venv, tests and caches out.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY operator/ operator/
COPY runtime/ runtime/
# A virtual environment, so the final stage copies one folder and no build tools.
RUN python -m venv /opt/pd-operator \
 && /opt/pd-operator/bin/pip install ".[router]" \
 && /opt/pd-operator/bin/python -c "import pd_operator.cli.main, pd_runtime.compat, kopf" \
 && /opt/pd-operator/bin/vllm-router --help > /dev/null \
 && ! /opt/pd-operator/bin/python -c "import torch" 2>/dev/null

FROM ${PYTHON_IMAGE}
LABEL org.opencontainers.image.title="pd-operator" \
      org.opencontainers.image.source="https://github.com/pd-operator/pd-operator" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /opt/pd-operator /opt/pd-operator
# Read-only root filesystem in the chart: no .pyc writes; /tmp is an emptyDir.
ENV PATH=/opt/pd-operator/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
# The chart's securityContext runs as 65532 (runAsNonRoot needs a numeric user).
USER 65532:65532
ENTRYPOINT ["pdctl"]
CMD ["operator", "run", "--help"]
