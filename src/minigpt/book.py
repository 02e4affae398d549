"""Helpers for the book's notebooks: show the package's own source so book and code cannot drift."""

from __future__ import annotations

import inspect

from IPython.display import Code


def show_source(obj: object) -> Code:
    """Display the source of a ``minigpt`` function, class or method, syntax-highlighted."""
    return Code(inspect.getsource(obj), language="python")
