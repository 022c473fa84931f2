"""Plumbing shared by the CLI commands: user-facing errors, staged output directories,
progress bars, devices, images and option parsing. Nothing here knows about ERFs."""
from __future__ import annotations

import contextlib
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

import click

try:  # the project's own error type, where the model-zoo part provides it
    from erftool.errors import ErftoolError
except ImportError:  # pragma: no cover - only while that module does not exist yet
    class ErftoolError(Exception):
        """Fallback so the CLI can catch one name either way."""

# What a user can cause: bad paths, bad values, unknown names. Anything else is a bug
# and keeps its traceback.
USER_ERRORS = (ErftoolError, ValueError, FileNotFoundError, NotADirectoryError,
               IsADirectoryError, PermissionError)


class CliFailure(click.ClickException):
    """One line on stderr ("Error: ..."), exit code 2, no traceback."""

    exit_code = 2

    def __init__(self, message: str):
        # Keep it one line: multi-line messages from libraries get joined.
        super().__init__(" ".join(str(message).split()))


def user_message(err: BaseException) -> str:
    if isinstance(err, OSError) and err.filename is not None and err.strerror:
        return f"{err.strerror}: {err.filename}"
    return str(err) or type(err).__name__


# ---------------------------------------------------------------- output staging

def _existing_ancestor(p: Path) -> Path:
    p = p.absolute()
    while not p.exists():
        p = p.parent
    return p


def check_out_dir(out: str | os.PathLike) -> Path:
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} exists and is not a directory")
    anc = _existing_ancestor(out.parent)
    if not os.access(anc, os.W_OK):
        raise PermissionError(13, "Permission denied", str(anc))
    return out


@contextlib.contextmanager
def staged_output(out: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside `out`; on success move its files into `out`
    (replacing same-named files, keeping others), on any failure delete it, so `out`
    never holds a half-written run."""
    out = check_out_dir(out).absolute()
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=_existing_ancestor(out.parent)))
    try:
        yield tmp
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, out)
            return
        for src in sorted(tmp.rglob("*")):
            if src.is_file():
                dst = out / src.relative_to(tmp)
                dst.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dst)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ---------------------------------------------------------------- progress / echo

class Console:
    """Messages and progress bars on stderr unless --quiet; results go to stdout."""

    def __init__(self, quiet: bool = False):
        self.quiet = quiet

    def info(self, msg: str) -> None:
        if not self.quiet:
            click.echo(msg, err=True)

    @contextlib.contextmanager
    def progress(self, items: Iterable, label: str, length: int | None = None):
        if self.quiet:
            yield items
            return
        with click.progressbar(items, label=label, length=length, file=sys.stderr,
                               show_pos=True) as bar:
            yield bar


# ---------------------------------------------------------------- parsing / devices

def parse_position(text: str | None):
    """'y,x' -> (y, x) ints."""
    if text is None:
        return None
    parts = [p.strip() for p in text.replace(" ", "").split(",")]
    if len(parts) != 2:
        raise ValueError(f"--position must be 'y,x', got {text!r}")
    try:
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ValueError(f"--position must be two integers 'y,x', got {text!r}") from None


def resolve_device(name: str):
    import torch
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda was requested but no CUDA GPU is available "
                         "(torch.cuda.is_available() is False); use --device cpu")
    return torch.device(name)
