"""`erftool verify`, `doctor` and `models`: thin views over erftool.theory, erftool.ops
and erftool.models, shaped into rows the CLI prints as tables or JSON."""
from __future__ import annotations

import dataclasses
import math

from erftool.cli_utils import Console
from erftool.cli_utils_models import require

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
    row = {"check": str(name), "formula": str(d.get("formula", "")),
           "max_error": None if err is None else float(err),
           "tolerance": None if tol is None else float(tol), "passed": bool(passed),
           "verdict": "PASS" if passed else "FAIL"}
    for k, v in d.items():  # keep anything extra the suite reports (details, n, ...)
        if k not in row and k not in ("name", "error", "tol", "ok"):
            row[k] = v if isinstance(v, (int, float, str, bool, type(None))) else str(v)
    return row


def _suite():
    """The theory suite's entry point: a callable returning check results."""
    theory = require("erftool.theory")
    for mod in (theory, getattr(theory, "checks", None), getattr(theory, "suite", None)):
        if mod is None:
            continue
        for attr in ("run_checks", "run_all", "verify", "run_suite", "run"):
            fn = getattr(mod, attr, None)
            if callable(fn):
                return fn
    raise ValueError("erftool.theory provides no check suite (run_checks) in this installation")


def run_checks(console: Console) -> list[dict]:
    fn = _suite()
    console.info("running the theory checks ...")
    raw = fn()
    if isinstance(raw, dict) and "checks" in raw:
        raw = raw["checks"]
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
    info["torch"] = torch.__version__
    info["cuda available"] = torch.cuda.is_available()
    info["python"] = platform.python_version()
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
