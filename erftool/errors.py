"""erftool's own exception type.

`ErftoolError` is a ValueError so that callers that already catch bad
arguments keep working; its message is one line that names the offending
value, so a CLI can print it as is without a traceback.
"""
from __future__ import annotations

__all__ = ["ErftoolError"]


class ErftoolError(ValueError):
    """A user-facing error: bad argument, unreadable file, incompatible checkpoint."""
