"""mrp_pass: post-training N:M pruning with multiple-removal (MRP) weight compensation.

Pipeline: calibrate (hessian) -> solve (solvers) -> rewrite the graph (graph, fx_pass) -> torch.compile
backend (backend). `prune(model, calibration)` is the one verb over a model."""

from .config import PruneConfig
from .fx_pass import prune, prune_graph
from .graph import LinearSite, find_linears
from .hessian import Hessian, damped_inverse
from .report import LayerReport, PruneReport
from .solvers import METHODS, SolveResult, solve
from .sparsity import Sparsity, is_nm_sparse, parse_sparsity

__all__ = [
    "METHODS", "Hessian", "LayerReport", "LinearSite", "PruneConfig", "PruneReport", "SolveResult", "Sparsity",
    "damped_inverse", "find_linears", "is_nm_sparse", "parse_sparsity", "prune", "prune_graph", "solve",
]
