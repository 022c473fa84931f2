"""`erftool verify`, `doctor` and `models`: thin views over erftool.theory, erftool.ops
and erftool.models, shaped into rows the CLI prints as tables or JSON."""
from __future__ import annotations

import dataclasses
import math

from erftool.commands.common import Console
from erftool.commands.models import require

VERIFY_COLUMNS = ("check", "formula", "max_error", "tolerance", "verdict")


def _as_dict(obj) -> dict:
    if dataclasses.is_dataclass(obj):
        return dataclasses.asdict(obj)
    if isinstance(obj, dict):
        return dict(obj)
    return {k: getattr(obj, k) for k in dir(obj) if not k.startswith("_")
            and not callable(getattr(obj, k))}


def _row(raw) -> dict:
    """One check result -> {check, formula, max_error, tolerance, passed, verdict}."""
    d = _as_dict(raw)
    name = d.get("check", d.get("name", "?"))
    err = d.get("max_error", d.get("error", math.nan))
    tol = d.get("tolerance", d.get("tol", math.nan))
    passed = d.get("passed", d.get("ok"))
    if passed is None:
        passed = bool(err is not None and tol is not None and float(err) <= float(tol))
    def num(v):  # NaN/inf become null: JSON has no NaN
        return None if v is None or not math.isfinite(float(v)) else float(v)
    row = {"check": str(name), "formula": str(d.get("formula", "")),
           "max_error": num(err), "tolerance": num(tol), "passed": bool(passed),
           "verdict": "PASS" if passed else "FAIL"}
    for k, v in d.items():  # keep anything extra the suite reports (details, n, ...)
        if k not in row and k not in ("name", "error", "tol", "ok"):
            row[k] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return row


def _suite():
    """The theory suite: erftool.theory.run_checks(quick=, backend=, names=)."""
    theory = require("erftool.theory")
    fn = getattr(theory, "run_checks", None)
    if not callable(fn):
        raise ValueError("erftool.theory provides no run_checks in this installation")
    return fn


def _check_names() -> list[str]:
    """Names of the suite's check functions, to run (and show progress) one by one."""
    try:
        checks = require("erftool.theory.checks")
    except ValueError:
        return []
    return [f.__name__ for f in getattr(checks, "CHECKS", [])]


def run_checks(console: Console, quick: bool = False, backend: str | None = None) -> list[dict]:
    fn = _suite()
    kwargs = {"quick": quick}
    if backend:
        kwargs["backend"] = backend
    names = _check_names()
    raw = []
    if names:
        with console.progress(names, "theory checks") as bar:
            for name in bar:
                raw += list(fn(names=[name], **kwargs))
    else:
        raw = list(fn(**kwargs))
    return [_row(r) for r in raw]


def _fmt(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else f"{v:.2e}"
    return str(v)


def format_table(rows: list[dict]) -> str:
    cells = [[_fmt(r.get(c)) for c in VERIFY_COLUMNS] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(VERIFY_COLUMNS)]
    # The formula column can be long; let it run on at the end rather than wrap.
    order = [0, 2, 3, 4, 1]
    out = ["  ".join(VERIFY_COLUMNS[i].ljust(widths[i]) for i in order).rstrip()]
    out.append("  ".join("-" * widths[i] for i in order))
    for row in cells:
        out.append("  ".join(row[i].ljust(widths[i]) for i in order).rstrip())
    for r in rows:  # say why a check failed, under the table
        if not r["passed"] and r.get("detail"):
            out.append(f"  {r['check']}: {r['detail']}")
    passed = sum(r["passed"] for r in rows)
    out.append(f"\n{passed}/{len(rows)} checks passed")
    return "\n".join(out)


def doctor_info() -> dict:
    import platform
    import torch
    ops = require("erftool.ops")
    info = {}
    try:
        raw = ops.backend_info()
        info.update(raw if isinstance(raw, dict) else {"backend": raw})
    except Exception as err:  # a broken native build must not hide the rest of the report
        info["backend"] = "unavailable"
        info["reason"] = f"{type(err).__name__}: {err}"
    info.setdefault("torch", torch.__version__)
    info.setdefault("cuda_available", torch.cuda.is_available())
    info.setdefault("python", platform.python_version())
    return info


def zoo_rows() -> list[dict]:
    models = require("erftool.models")
    listing = models.list_models()
    rows = []
    items = listing.items() if isinstance(listing, dict) else ((n, None) for n in listing)
    for name, desc in items:
        if desc is None:
            desc = ""
        elif not isinstance(desc, str):
            desc = getattr(desc, "description", None) or (desc.__doc__ or "").strip().split("\n")[0]
        rows.append({"name": str(name), "description": str(desc)})
    return rows
