import torch

from mrp_pass import is_nm_sparse, solve


def test_solve_runs_and_meets_2_4():
    torch.manual_seed(0)
    x = torch.randn(16, 256)
    r = solve(torch.randn(8, 16), 2 * x @ x.T)
    assert is_nm_sparse(r.weight)
