"""The development tooling (pd_dev, tools/) seen from the product: an optional extra, loaded by
name when it is installed and never imported otherwise (.importlinter forbids the import), so a
product install without it still runs. `pdctl dev ...` and the development CA of
`pdctl operator run --local-webhook` come from it."""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

DEV_PACKAGE = "pd_dev"


def dev_module(name: str) -> ModuleType | None:
    """pd_dev.<name>, or None when the pd_dev package is not installed (a module missing inside
    an installed pd_dev is an error, not an absence)."""
    if importlib.util.find_spec(DEV_PACKAGE) is None:
        return None
    return importlib.import_module(f"{DEV_PACKAGE}.{name}")
