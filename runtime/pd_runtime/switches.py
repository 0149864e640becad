"""The runtime's environment switches (PD_RUNTIME_*) that pick between a few named paths: a
value outside the choices is refused by name, never read as the default."""

from __future__ import annotations

import os


def env_choice(name: str, choices: tuple[str, ...], default: str) -> str:
    """The value of the environment variable `name` (`default` when unset), one of `choices`;
    ValueError naming the variable, the value and the choices otherwise."""
    raw = os.environ.get(name, default)
    if raw not in choices:
        raise ValueError(f"{name}={raw!r}: expected one of {', '.join(choices)}")
    return raw
