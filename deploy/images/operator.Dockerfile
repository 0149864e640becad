# The operator image (ghcr.io/pd-operator/pd-operator, the chart's default image): `pdctl`
# with the webhook, kopf, the Kubernetes client, pydantic and pd_runtime.compat. The base
# dependencies of pyproject.toml only: no torch, no nixl (the `runtime` extra is not installed),
# so the image stays small and starts fast.
#
# From a registry base, at the repository root:
#   docker build -f deploy/images/operator.Dockerfile -t ghcr.io/pd-operator/pd-operator:0.1.0 .
# operator.Dockerfile.dockerignore (BuildKit reads it) keeps .venv, tests and caches out.
# Without a registry (this repository's development machine): `pdctl dev images build` builds
# it FROM a local Debian base (debootstrap) with a staged context; see docs/images.md.
# No `# syntax=` line: it would pull a frontend image, and the legacy builder must work too.

# Any Debian/Ubuntu-like image with python3 >= 3.11 and its venv module.
ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS build
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
# A virtual environment, so the final stage copies one folder and no build tools.
RUN python3 -m venv /opt/pd-operator
ENV PATH=/opt/pd-operator/bin:$PATH
WORKDIR /src
# The dependencies first, from pyproject.toml and the version file only (README.md, which
# pyproject.toml names, is an empty stand-in here): a change in the sources or the README then
# reuses this layer; the package itself is installed below.
COPY pyproject.toml ./
COPY runtime/pd_runtime/__init__.py runtime/pd_runtime/__init__.py
RUN touch README.md && pip install ".[router]" && pip uninstall -y pd-operator
COPY README.md ./
COPY operator/ operator/
COPY runtime/ runtime/
RUN pip install ".[router]" \
 && python3 -c "import pd_operator.cli.main, pd_runtime.compat, kopf" \
 && vllm-router --help > /dev/null \
 && ! python3 -c "import torch" 2>/dev/null

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
