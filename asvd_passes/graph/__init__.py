"""Graph side of the pipeline: capture (torch.export), match projections, observe, rewrite."""

from .match import Projection, ProjectionGroup, find_projections, group_by_input, output_projection_name
from .observers import InputStatistics, NonFiniteActivationError
from .passes import InsertObserversPass, LowRankRewritePass, RemoveObserversPass
from .trace import TraceError, capture

__all__ = [
    "InputStatistics",
    "InsertObserversPass",
    "LowRankRewritePass",
    "NonFiniteActivationError",
    "Projection",
    "ProjectionGroup",
    "RemoveObserversPass",
    "TraceError",
    "capture",
    "find_projections",
    "group_by_input",
    "output_projection_name",
]
