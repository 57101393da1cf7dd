"""The combination, at the public path ``specialists.combine`` (implemented in
:mod:`specialists.core.combine`)::

    from specialists.combine import combine, objective
    q = combine(p_general, subsets, p_specialists, active, solver="em")
"""

from .core.combine import (  # noqa: F401
    ROUTINGS,
    SOLVERS,
    CombineInputError,
    SubsetTable,
    combine,
    membership,
    objective,
    prepare_subsets,
    route,
)

__all__ = ["ROUTINGS", "SOLVERS", "CombineInputError", "SubsetTable", "combine", "membership", "objective",
           "prepare_subsets", "route"]
