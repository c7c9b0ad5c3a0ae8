"""Layer solvers on synthetic layers with correlated inputs."""

import itertools
import math

import pytest
import torch

from mrp_pass import METHODS, Hessian, is_nm_sparse, parse_sparsity, solve
from mrp_pass.refit import solve_mrp_block


def correlated_layer(rows=32, cols=64, tokens=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(cols, cols, generator=g) / cols**0.5 + torch.eye(cols)
    x = mix @ torch.randn(cols, tokens, generator=g) + 0.5 * torch.randn(cols, 1, generator=g)
    w = torch.randn(rows, cols, generator=g)
    return w, x.double(), 2 * x @ x.T


def ls_refit(w, x, keep):
    """Brute force: for each row, least squares of the kept weights against the dense output."""
    out = torch.zeros_like(w, dtype=torch.float64)
    for i in range(w.shape[0]):
        k = keep[i]
        out[i, k] = torch.linalg.lstsq(x[k].T, w[i].double() @ x).solution
    return out


@pytest.mark.parametrize("method", METHODS)
def test_every_group_of_a_2_4_result_has_two_zeros(method):
    w, _, h = correlated_layer()
    r = solve(w, h, "2:4", method=method)
    groups = r.weight.reshape(w.shape[0], -1, 4)
    assert ((groups == 0).sum(-1) == 2).all()
    assert torch.equal(r.mask, r.weight != 0)
    assert torch.isfinite(r.weight).all()


@pytest.mark.parametrize("method", METHODS)
def test_reported_loss_equals_direct_measurement(method):
    w, x, h = correlated_layer()
    r = solve(w, h, "2:4", method=method)
    direct = ((r.weight.double() - w.double()) @ x).pow(2).sum().item()
    assert r.loss == pytest.approx(direct, rel=1e-4)
    assert r.relative_error == pytest.approx(direct / (w.double() @ x).pow(2).sum().item(), rel=1e-4)


def test_solution_m_on_whole_row_is_the_least_squares_refit():
    w, x, h = correlated_layer()
    r = solve(w, h, "2:4", method="mrp-m", blocksize=w.shape[1], percdamp=0.0)
    ref = ls_refit(w, x, r.mask)
    assert torch.allclose(r.weight.double(), ref, atol=2e-3, rtol=1e-3)


def test_conjugate_gradient_refit_reaches_the_least_squares_loss_for_its_mask():
    for seed, (rows, cols) in ((1, (32, 64)), (2, (64, 128))):
        w, x, h = correlated_layer(rows=rows, cols=cols, seed=seed)
        r = solve(w, h, "2:4", method="mrp", percdamp=0.0)
        exact = 0.5 * float(((w.double() - ls_refit(w, x, r.mask)) @ x).pow(2).sum() * 2)
        assert r.loss == pytest.approx(exact, rel=2e-3)


@pytest.mark.parametrize("spec", ["2:4", "1:4", "4:8"])
def test_swap_refinement_never_increases_the_loss_and_keeps_the_pattern(spec):
    for seed in range(3):
        w, _, h = correlated_layer(rows=48, cols=128, seed=seed)
        base = solve(w, h, spec, method="mrp", swap_iters=0)
        refined = solve(w, h, spec, method="mrp", swap_iters=2, blocksize=64)
        n, m = map(int, spec.split(":"))
        assert is_nm_sparse(refined.weight, n, m)
        assert refined.loss <= base.loss * (1 + 1e-6)
    assert refined.loss < base.loss  # and it does find improvements on correlated inputs


def test_refine_swaps_exact_delta_single_group():
    """On one group, the swap refinement reaches the best of all masks (the deltas are exact)."""
    from mrp_pass.swaps import refine_swaps, removal_losses

    g = torch.Generator().manual_seed(5)
    a = torch.randn(8, 8, generator=g, dtype=torch.float64)
    a = a @ a.T + 2 * torch.eye(8, dtype=torch.float64)
    w = torch.randn(6, 8, generator=g, dtype=torch.float64)
    from mrp_pass import Sparsity

    sp = Sparsity(n=4, m=8)
    keep = torch.zeros(6, 8, dtype=torch.bool)
    keep[:, :4] = True
    refined = refine_swaps(w, a, keep, sp, iters=20)
    best = torch.stack([
        removal_losses(w, a, torch.zeros(6, 8, dtype=torch.bool).index_fill_(1, torch.tensor(c), True))
        for c in itertools.combinations(range(8), 4)
    ]).min(0).values
    got = removal_losses(w, a, refined)
    assert (got <= removal_losses(w, a, keep) + 1e-12).all()
    assert (got <= best * 1.5 + 1e-12).all()  # local search: close to the optimum


def test_solution_m_block_matches_closed_form_per_row():
    """Z_P = w_P [A_PP]^-1 per row, checked row by row against a dense solve."""
    g = torch.Generator().manual_seed(3)
    a = torch.randn(16, 16, generator=g, dtype=torch.float64)
    a = a @ a.T + 16 * torch.eye(16, dtype=torch.float64)
    w = torch.randn(5, 16, generator=g, dtype=torch.float64)
    keep = torch.rand(5, 16, generator=g) > 0.4
    z = solve_mrp_block(w, a, keep)
    for i in range(5):
        p = ~keep[i]
        expect = torch.zeros(16, dtype=torch.float64)
        expect[p] = torch.linalg.solve(a[p][:, p], w[i, p])
        assert torch.allclose(z[i], expect, atol=1e-10)


def test_group_mask_is_best_of_all_masks_for_a_single_group():
    """One row of width M: the group-exact rule searches all C(4,2) subsets with the exact loss."""
    for seed in range(5):
        w, x, h = correlated_layer(rows=3, cols=4, tokens=64, seed=seed)
        r = solve(w, h, "2:4", method="mrp", mask_rule="group", percdamp=0.0)
        for i in range(3):
            best = min(
                ((w[i].double() @ x - ls_refit(w[i : i + 1], x, keep_row(kept))[0] @ x).pow(2).sum().item())
                for kept in itertools.combinations(range(4), 2)
            )
            got = ((w[i].double() @ x - r.weight[i].double() @ x).pow(2).sum().item())
            assert got == pytest.approx(best, rel=1e-6, abs=1e-9)


def keep_row(kept):
    k = torch.zeros(1, 4, dtype=torch.bool)
    k[0, list(kept)] = True
    return k


def test_mrp_beats_sparsegpt_and_sparsegpt_beats_magnitude_on_correlated_inputs():
    errs = {m: 0.0 for m in ("magnitude", "sparsegpt", "mrp")}
    for seed in range(3):
        w, _, h = correlated_layer(rows=64, cols=128, seed=seed)
        for m in errs:
            errs[m] += solve(w, h, "2:4", method=m).relative_error
    assert errs["mrp"] < errs["sparsegpt"] < errs["magnitude"]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_weights_in_same_dtype_out(dtype):
    w, _, h = correlated_layer()
    r = solve(w.to(dtype), h, "2:4", method="mrp")
    assert r.weight.dtype == dtype
    assert is_nm_sparse(r.weight)


def test_deterministic():
    w, _, h = correlated_layer()
    a, b = solve(w, h, method="mrp"), solve(w, h, method="mrp")
    assert torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("spec,n,m", [("1:4", 1, 4), ("4:8", 4, 8), ("2:8", 2, 8)])
def test_other_nm_patterns(spec, n, m):
    w, _, h = correlated_layer()
    magnitude = solve(w, h, spec, method="magnitude")
    for method in ("sparsegpt", "mrp-m", "mrp"):
        r = solve(w, h, spec, method=method)
        assert is_nm_sparse(r.weight, n, m)
        assert ((r.weight.reshape(w.shape[0], -1, m) != 0).sum(-1) == n).all()
        assert r.loss < magnitude.loss, method  # same pattern, compensated: strictly better than no update


@pytest.mark.parametrize("spec", [0.5, "50%", 0.3])
def test_unstructured_prunes_the_fraction_of_every_row(spec):
    w, _, h = correlated_layer()
    frac = 0.3 if spec == 0.3 else 0.5
    magnitude = solve(w, h, spec, method="magnitude")
    for method in METHODS:
        r = solve(w, h, spec, method=method)
        assert ((r.weight == 0).sum(1) == round(w.shape[1] * frac)).all(), method
        if method in ("sparsegpt", "mrp-m", "mrp"):
            assert r.loss < magnitude.loss, method


def test_dead_inputs_are_pruned_first_and_cost_nothing():
    w, x, _ = correlated_layer()
    x = x.clone()
    x[::4] = 0  # one dead input in every group
    h = 2 * x @ x.T
    r = solve(w, h.float(), "2:4", method="mrp")
    assert (r.weight[:, ::4] == 0).all()
    assert torch.isfinite(r.weight).all()


def test_hessian_streaming_matches_batch_formula_for_any_shape():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(2, 7, 16, generator=g), torch.randn(5, 16, generator=g), torch.randn(1, 1, 3, 16, generator=g)]
    acc = Hessian(16, dtype=torch.float64)
    for x in xs:
        acc.add(x)
    flat = torch.cat([x.reshape(-1, 16) for x in xs]).double()
    assert acc.nsamples == flat.shape[0]
    assert torch.allclose(acc.matrix, 2 * flat.T @ flat / flat.shape[0])


@pytest.mark.parametrize("spec", ["2:4", "1:4", 0.5])
def test_admm_mask_meets_the_pattern_and_beats_the_sweep_masks_on_correlated_inputs(spec):
    w, x, h = correlated_layer(rows=64, cols=128, seed=4)
    admm = solve(w, h, spec, method="mrp", mask_rule="admm")
    sweep = solve(w, h, spec, method="mrp", mask_rule="sparsegpt")
    if spec == 0.5:
        assert ((admm.weight == 0).sum(1) == 64).all()
    else:
        n, m = map(int, spec.split(":"))
        assert is_nm_sparse(admm.weight, n, m)
    assert admm.loss < sweep.loss
    direct = ((admm.weight.double() - w.double()) @ x).pow(2).sum().item()
    assert admm.loss == pytest.approx(direct, rel=1e-4)


def test_fast_2_4_mask_keeps_what_topk_keeps_ties_and_nan_included():
    g = torch.Generator().manual_seed(0)
    with_nan = torch.randn(8, 16, generator=g)
    with_nan[1, 2] = with_nan[5, 13] = float("nan")
    with_inf = torch.randn(8, 16, generator=g)
    with_inf[0, :3] = float("inf")
    with_inf[2, 4:6] = float("-inf")
    scores = [torch.randn(33, 64, generator=g), torch.randint(0, 3, (33, 64), generator=g).float(),
              torch.zeros(3, 8), with_nan, with_inf]
    for s in scores:
        groups = s.reshape(s.shape[0], -1, 4)
        expected = torch.zeros_like(groups, dtype=torch.bool).scatter_(2, groups.topk(2, dim=2).indices, True)
        assert torch.equal(parse_sparsity("2:4").mask(s), expected.reshape(s.shape))


def test_mrp_default_is_the_measured_one_admm_mask_and_cg_refit():
    w, _, h = correlated_layer(seed=2)
    default = solve(w, h, "2:4")
    assert torch.equal(default.weight, solve(w, h, "2:4", method="mrp", mask_rule="admm").weight)
    assert not torch.equal(default.mask, solve(w, h, "2:4", method="mrp", mask_rule="sparsegpt").mask)


@pytest.mark.parametrize("method,options", [
    ("mrp", {}), ("mrp", {"swap_iters": 1}),
    *[("mrp", {"mask_rule": rule}) for rule in ("obs", "sparsegpt", "group")],
    ("mrp-m", {"mask_rule": "admm"}), ("mrp-s", {"mask_rule": "admm"}), ("sparsegpt", {}),
])
def test_every_solver_path_gets_the_factor_it_needs(method, options):
    # solve skips H^-1 and its Cholesky factor for the default ADMM + CG: any path that sweeps must still get them
    w, x, h = correlated_layer(rows=8, cols=32)
    r = solve(w, h, "2:4", method=method, **options)
    assert is_nm_sparse(r.weight) and math.isfinite(r.loss)
    assert r.loss == pytest.approx(0.5 * float((((r.weight - w).double() @ x) ** 2).sum() * 2), rel=1e-3)


def test_admm_scaled_dual_gives_the_textbook_iterates():
    """mask_admm keeps the scaled dual u = V / rho; the iterates are those of ALPS' unscaled splitting
    X = (W H - V + rho D)(H + rho I)^-1, D = proj(X + V / rho), V += rho (X - D), rho *= growth (in float64 the
    same mask and D to rounding)."""
    from mrp_pass.solvers import mask_admm

    torch.manual_seed(0)
    sp = parse_sparsity("2:4")
    x = torch.randn(256, 32, dtype=torch.float64) * torch.rand(32, dtype=torch.float64)
    h = 2 * x.T @ x / 256 + 0.01 * torch.eye(32, dtype=torch.float64)
    w = torch.randn(12, 32, dtype=torch.float64)
    start = torch.where(sp.mask(w.abs()), w, 0.0)
    for iters, growth in [(22, 1.16), (5, 1.3)]:
        d, v, rho = start, torch.zeros_like(w), 0.05 * float(h.diagonal().mean())
        for _ in range(iters):
            xk = (w @ h - v + rho * d) @ torch.linalg.inv(h + rho * torch.eye(32, dtype=h.dtype))
            keep = sp.mask((xk + v / rho).abs())
            d = (xk + v / rho) * keep
            v = v + rho * (xk - d)
            rho *= growth
        for rows in (None, 100):  # both GEMM orders
            d_ours, keep_ours = mask_admm(w, h, sp, start, iters=iters, growth=growth, rows=rows)
            assert torch.equal(keep_ours, keep)
            torch.testing.assert_close(d_ours, d, rtol=1e-9, atol=1e-12)
