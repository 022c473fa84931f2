"""Offset policy shared by the ERF engine and erftool's deformable modules.

The ERF of a deformable network has two parts: the path sum through the
sampling locations / kernel values (what the DC/DK theory describes, with the
offsets held fixed) and an extra term through the offset generators, because
the offsets themselves depend on the input. The policy selects which one an
autograd ERF measures:

* ``"total"``  (default): offsets stay in the graph -> the full Jacobian.
* ``"frozen"``: generated offsets are ``.detach()``-ed -> the path-sum ERF.
* ``"zero"``:   generated offsets are replaced by zeros -> the rigid skeleton
  (used for the theoretical receptive field of a deformable network).

Modules that generate offsets call :func:`prepare_offsets` (or, at least,
detach when :func:`offsets_frozen` is true). A ContextVar keeps the policy
local to the calling thread / task.
"""
from __future__ import annotations

import contextlib
import contextvars

MODES = ("total", "frozen", "zero")
_MODE: contextvars.ContextVar[str] = contextvars.ContextVar("erftool_offset_mode", default="total")


def offsets_mode() -> str:
    """The active policy: "total", "frozen" or "zero"."""
    return _MODE.get()


def offsets_frozen() -> bool:
    """True when generated offsets must be detached (policy "frozen" or "zero")."""
    return _MODE.get() != "total"


def prepare_offsets(offset):
    """Apply the active policy to a generated offset tensor (or None)."""
    if offset is None:
        return None
    mode = _MODE.get()
    if mode == "frozen":
        return offset.detach()
    if mode == "zero":
        return offset.detach().new_zeros(offset.shape)
    return offset


@contextlib.contextmanager
def offset_policy(mode: str):
    """Set the policy inside a ``with`` block (nests and restores)."""
    if mode not in MODES:
        raise ValueError(f"unknown offsets mode {mode!r} (choose from {', '.join(MODES)})")
    token = _MODE.set(mode)
    try:
        yield
    finally:
        _MODE.reset(token)


def frozen_offsets():
    """``with frozen_offsets():`` -> erftool modules detach their offsets."""
    return offset_policy("frozen")


def zero_offsets():
    """``with zero_offsets():`` -> erftool modules use zero offsets (rigid grid)."""
    return offset_policy("zero")
