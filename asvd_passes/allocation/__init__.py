"""Rank allocation: which rank each projection keeps under a parameter budget.

* ``uniform``: one ratio for every projection (the floor; see :mod:`asvd_passes.ranks`).
* ``strs``: ASVD's sensitivity-based truncation-rank search, faithful, exact budget.
* ``fisher``: closed-form output error per rank × diagonal-Fisher loss weight, global greedy.
"""

from .budget import greedy_plan, rank_grid
from .fisher import fisher_plan, loss_cost_curve
from .sensitivity import output_fisher
from .strs import DEFAULT_CANDIDATES, measure_sensitivities, strs_plan

__all__ = [
    "DEFAULT_CANDIDATES",
    "fisher_plan",
    "greedy_plan",
    "loss_cost_curve",
    "measure_sensitivities",
    "output_fisher",
    "rank_grid",
    "strs_plan",
]
