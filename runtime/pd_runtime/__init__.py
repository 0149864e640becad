"""pd_runtime: the bundled P/D runtime (compat rules, KV transfer over NIXL, reference engine)."""

__version__ = "0.1.0"
