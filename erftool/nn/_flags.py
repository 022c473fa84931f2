"""Process-wide switches that change how the deformable modules run.

`offsets_frozen()` is the ERF engine's "frozen-offset" mode: inside it every
erftool.nn module detaches the offsets (and DCNv2 masks) its generators
produce, so d(output)/d(input) only follows the sampling paths and kernel
values, as in the path-sum theory of the ERF, and not the extra path through
the offset generators. The state is thread-local so that concurrent analyses
in different threads do not leak into each other.
"""
from __future__ import annotations

import contextlib
import threading

__all__ = ["offsets_frozen", "offsets_are_frozen"]

_state = threading.local()


def offsets_are_frozen() -> bool:
    """True inside an `offsets_frozen()` block (in this thread)."""
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def offsets_frozen(enabled: bool = True):
    """Detach the generated offsets of every erftool.nn module in the block.

    Nested blocks are allowed; `offsets_frozen(False)` is a no-op block so a
    caller can pass a flag straight through.
    """
    if not enabled:
        yield
        return
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1
