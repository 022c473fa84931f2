"""ERF theory for linear (and ReLU-gated) rigid / DC / DK networks, written
independently of autograd, and the checks that compare it with compute_erf.

    from erftool.theory import run_checks, format_table
    results = run_checks(quick=False)   # list[CheckResult]
    print(format_table(results))
"""
from .checks import CheckResult, all_passed, format_table, run_checks, to_json
from .linear import compose_kernels, multinomial, ones_erf, ones_variance, rf_size
from .pathsum import Layer, path_sum_erf

__all__ = ["run_checks", "CheckResult", "format_table", "to_json", "all_passed",
           "compose_kernels", "multinomial", "ones_erf", "ones_variance", "rf_size", "Layer",
           "path_sum_erf"]
