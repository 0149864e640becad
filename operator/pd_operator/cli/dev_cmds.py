"""Placeholder: filled in by its own issue."""


def register(sub) -> None:  # noqa: ARG001 - nothing yet
    return None
