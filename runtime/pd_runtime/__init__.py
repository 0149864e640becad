"""pd_runtime: the bundled P/D runtime (compat rules, KV transfer over NIXL, reference engine)."""

# The project's one version string: the distribution (pyproject.toml reads it), the operator
# (pd_operator.__version__), the default router image tag and the chart's appVersion (generated).
__version__ = "0.1.0"
