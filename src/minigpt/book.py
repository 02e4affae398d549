"""Helpers for the book's notebooks.

Design choices:
- ``show_source`` displays the package's own source, so the book and the code cannot drift.
- ``glue`` stores a value for the rendered book's prose through myst-nb when it is installed
  (the book build) and otherwise just shows it (or nothing), so a chapter also runs where
  myst-nb is absent, e.g. on Colab. myst-nb is imported when ``glue`` is called: importing
  this module never needs it.
"""

from __future__ import annotations

import inspect
from typing import Any

from IPython.display import Code
from IPython.display import display as show_value


def show_source(obj: object) -> Code:
    """Display the source of a ``minigpt`` function, class or method, syntax-highlighted."""
    return Code(inspect.getsource(obj), language="python")


def glue(name: str, value: Any, display: bool = True) -> None:
    """Glue ``value`` under ``name`` for the book's prose (myst-nb), or show it without myst-nb.

    With myst-nb this is ``myst_nb.glue``; without it the value is displayed when ``display``
    is true and nothing happens otherwise (there is no book build to store it for).
    """
    try:
        from myst_nb import glue as myst_glue
    except ImportError:  # plain Jupyter, Colab: no book build to glue into
        if display:
            show_value(value)
        return
    myst_glue(name, value, display=display)
