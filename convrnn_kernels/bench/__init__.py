"""Benchmarks of convrnn_kernels against PyTorch's own ops: `python -m convrnn_kernels.bench`.

Each module named in CASE_MODULES holds the cases of one op family and exposes
`cases(quick: bool) -> list[core.Case]`; core.py and report.py know nothing op-specific, so
adding a family (conv.py, rnn.py) means writing its module and naming it here.
"""
import importlib
from typing import List

from .core import Case

CASE_MODULES = ("pooling", "lrn", "conv", "rnn")


def load_cases(quick: bool = False) -> List[Case]:
    """Every registered case, in registry order; quick mode shrinks the batch by 4."""
    cases: List[Case] = []
    for name in CASE_MODULES:
        cases += importlib.import_module(f"{__name__}.{name}").cases(quick)
    return cases
