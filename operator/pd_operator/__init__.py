"""pd-operator: Kubernetes operator for disaggregated prefill/decode LLM serving."""

from pd_runtime import __version__  # the one version string of the distribution

__all__ = ["__version__"]
