"""mrp_pass: post-training N:M pruning with multiple-removal (MRP) weight compensation."""

from .hessian import Hessian, damped_inverse
from .solvers import METHODS, SolveResult, solve
from .sparsity import Sparsity, is_nm_sparse, parse_sparsity

__all__ = ["METHODS", "Hessian", "SolveResult", "Sparsity", "damped_inverse", "is_nm_sparse", "parse_sparsity",
           "solve"]
from .graph import LinearSite, find_linears
from .prune import LayerReport, PruneReport, prune, prune_graph

__all__ += ["LayerReport", "LinearSite", "PruneReport", "find_linears", "prune", "prune_graph"]
