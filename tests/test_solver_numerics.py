"""The solvers on hard numbers: singular, indefinite and non-finite Hessians, dead inputs, extreme weights,
float32 Cholesky failures (float64 fallbacks), a hypothesis fuzz of every method on small random layers, and
what the pass says of a Hessian that overflowed or is singular."""

import logging
import math
import warnings

import pytest
import torch
from helpers import correlated_layer
from hypothesis import given, settings
from hypothesis import strategies as st

from mrp_pass import METHODS, Hessian, damped_inverse, is_nm_sparse, parse_sparsity, solve
from mrp_pass import refit as refit_module
from mrp_pass.hessian import damped_cholesky, damped_hessian


def meets(w: torch.Tensor, sparsity) -> bool:
    sp = parse_sparsity(sparsity)
    if sp.structured:
        return is_nm_sparse(w, sp.n, sp.m)
    return bool(((w == 0).sum(1) >= round(w.shape[1] * sp.fraction)).all())


# Hessians


def test_singular_hessian_escalates_damping_with_a_warning(caplog):
    w, _, _ = correlated_layer()
    h = torch.ones(32, 32)  # rank 1
    with caplog.at_level(logging.WARNING, logger="mrp_pass.hessian"):
        result = solve(w, h, "2:4", "mrp", percdamp=0.0)
    assert "Cholesky of H failed with damping 0 (attempt 1); retrying with" in caplog.text
    assert torch.isfinite(result.weight).all() and is_nm_sparse(result.weight)


def test_hessian_beyond_damping_gives_a_clear_error(caplog):
    h = torch.tensor([[1.0, 1e6], [1e6, 1.0]])  # indefinite: eigenvalue -1e6, damping tops out at 1e3 x mean diag
    with caplog.at_level(logging.WARNING, logger="mrp_pass.hessian"), \
            pytest.raises(torch.linalg.LinAlgError, match=r"not positive definite even with damping 1e\+03 "
                                                          r"\(= 1e\+03 x mean diag, 6 tries\)"):
        damped_inverse(h)
    assert caplog.text.count("Cholesky of H failed") == 5


def test_cholesky_factor_in_place_of_the_inverse_has_the_same_damping():
    # damped_cholesky (the default mrp's ADMM + CG, the target corrections) must damp exactly as the inverse's callers
    # do, escalation included: the factor is that of the very H + lambda I returned beside it
    h = torch.ones(16, 16)  # rank 1: percdamp 0 escalates
    h_damped, inv = damped_hessian(h, 0.0)
    h_damped2, chol = damped_cholesky(h, 0.0)
    assert torch.equal(h_damped, h_damped2) and torch.equal(chol, chol.tril())
    torch.testing.assert_close(chol @ chol.T, h_damped)
    torch.testing.assert_close(torch.cholesky_inverse(chol), inv)


def test_mildly_indefinite_hessian_is_damped():
    a = torch.tensor([[1.0, 2.0], [2.0, 1.0]])  # eigenvalues 3, -1: damping 10 x mean diag makes it PD
    assert torch.isfinite(damped_inverse(a)).all()


def test_negative_diagonal_is_not_a_hessian():
    w, _, h = correlated_layer()
    h[3, 3] = -1.0
    with pytest.raises(ValueError, match="1 negative diagonal entries"):
        solve(w, h, "2:4", "sparsegpt")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_hessian(bad):
    w, _, h = correlated_layer()
    h[0, 1] = bad
    with pytest.raises(FloatingPointError, match="the Hessian contains NaN or Inf"):
        solve(w, h, "2:4", "mrp")


def test_non_finite_weight():
    w, _, h = correlated_layer()
    w[2, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="the weight contains NaN or Inf"):
        solve(w, h, "2:4", "mrp")


def test_hessian_rejects_nan_and_wrong_width():
    hess = Hessian(8)
    with pytest.raises(FloatingPointError, match="NaN or Inf"):
        hess.add(torch.tensor([[float("inf")] * 8]))
    with pytest.raises(ValueError, match="input of width 9 fed to a Hessian of width 8"):
        hess.add(torch.randn(2, 9))
    with pytest.raises(ValueError, match="Hessian dtype must be"):
        Hessian(8, dtype=torch.float16)


def test_mismatched_hessian_shape():
    with pytest.raises(ValueError, match=r"hessian of shape \(8, 8\) does not match weight of shape \(4, 16\)"):
        solve(torch.randn(4, 16), torch.eye(8))


@pytest.mark.parametrize("method", METHODS)
def test_dead_input_columns(method):
    w, _, h = correlated_layer()
    dead = [0, 5, 6, 7, 30]  # 5, 6, 7: three of one group of 4 (more than 2:4 prunes)
    h[dead, :] = 0
    h[:, dead] = 0
    result = solve(w, h, "2:4", method)
    assert torch.isfinite(result.weight).all() and is_nm_sparse(result.weight)
    assert (result.weight[:, dead] == 0).all()  # a dead input's weight never matters: pruned / zeroed first


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("method", METHODS)
def test_extreme_weights_stay_finite_and_meet_the_pattern(method, scale):
    w, x, h = correlated_layer()
    result = solve(w * scale, h, "2:4", method)
    assert torch.isfinite(result.weight).all() and is_nm_sparse(result.weight)
    # the reported relative error is ||dW X||^2 / ||W X||^2, measured here from X in float64
    w64, x64 = (w * scale).double(), x.double()
    direct = ((result.weight.double() - w64) @ x64.T).pow(2).sum() / (w64 @ x64.T).pow(2).sum()
    assert result.relative_error == pytest.approx(direct.item(), rel=1e-4)


@pytest.mark.parametrize("scale", [1e30, 1e-30])
@pytest.mark.parametrize("method", ["sparsegpt", "mrp-m", "mrp"])
def test_extreme_weights_are_solved_as_well_as_ordinary_ones(method, scale):
    """w^2 overflows / underflows in float32, every score ties and the mask is arbitrary
    (relative error 0.45 instead of 0.11 at 1e-30). The solvers are homogeneous in W, so the result must be
    the ordinary one scaled."""
    w, _, h = correlated_layer()
    ref = solve(w, h, "2:4", method)
    result = solve(w * scale, h, "2:4", method)
    assert torch.equal(result.mask, ref.mask)
    assert result.relative_error == pytest.approx(ref.relative_error, rel=1e-4)


def scaled_hilbert(k: int) -> torch.Tensor:
    """lcm(1..2k-1) / (i + j + 1): positive definite, integer entries (exact in float32 for k <= 9)."""
    i = torch.arange(k, dtype=torch.float64)
    return math.lcm(*range(1, 2 * k)) / (i[:, None] + i[None, :] + 1)


def spy_solve(monkeypatch) -> list:
    """Record (dtype, batch) of every torch.linalg.solve call: the float64 fallbacks of solve_mrp_block."""
    calls, real = [], torch.linalg.solve

    def spy(a, b, *args, **kwargs):
        calls.append((a.dtype, a.shape[0] if a.dim() == 3 else 1))
        return real(a, b, *args, **kwargs)
    monkeypatch.setattr(torch.linalg, "solve", spy)
    return calls


def rel_err(x: torch.Tensor, ref: torch.Tensor) -> float:
    return float((x.double() - ref).norm() / ref.norm())


def test_solution_m_falls_back_to_float64_when_float32_cholesky_fails(monkeypatch):
    """A_PP positive definite (condition 5e8, exactly representable in float32) whose float32 Cholesky fails:
    the systems are solved in float64, which is accurate where any float32 solve is not."""
    a64 = scaled_hilbert(7)
    a32 = a64.float()
    assert torch.equal(a32.double(), a64)
    assert torch.linalg.cholesky_ex(a64).info.item() == 0 and torch.linalg.cholesky_ex(a32).info.item() != 0
    w64 = torch.randn(3, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    keep = torch.zeros(3, 7, dtype=torch.bool)  # every weight pruned: A_PP = A
    ref = torch.linalg.solve(a64, w64.T).T  # Z = w_P [A_PP]^-1 (A symmetric)
    lu32 = torch.linalg.solve(a32, w64.float().T).T  # the best a float32 solve does
    calls = spy_solve(monkeypatch)
    z = refit_module.solve_mrp_block(w64.float(), a32, keep)
    assert calls == [(torch.float64, 3)]
    assert z.dtype == torch.float32
    assert rel_err(z, ref) < 1e-6 < 1e-2 < rel_err(lu32, ref)
    res = (z.double() @ a64 - w64.float().double()).abs().max()
    assert res <= 1e-4 * (a64.abs().max() * z.double().abs().max() + w64.abs().max())
    calls.clear()
    assert torch.allclose(refit_module.solve_mrp_block(w64, a64, keep), ref, rtol=1e-6)  # float64 throughout
    assert calls == []  # float64 input: Cholesky succeeds, no fallback


def test_solution_m_redoes_in_float64_only_the_rows_whose_residual_is_too_large(monkeypatch):
    """The residual check redoes the rows above RESIDUAL_TOL in float64. Cholesky is backward stable, so a
    float32 solve that factorises lands near 1e-7 relative residual even at condition 1e7 (forward error 3e-2):
    the tolerance is lowered to 0 here so that the ill-conditioned row (nonzero residual) is redone and the
    exact row (residual exactly 0) is not."""
    k = 6
    a64 = torch.zeros(k + 2, k + 2, dtype=torch.float64)
    a64[:k, :k] = scaled_hilbert(k)  # condition 1.5e7: float32 Cholesky succeeds, the answer is inaccurate
    a64[k:, k:] = 4 * torch.eye(2, dtype=torch.float64)  # row 1 prunes these two: Cholesky and solve exact
    a32 = a64.float()
    assert torch.equal(a32.double(), a64) and torch.linalg.cholesky_ex(a32[:k, :k]).info.item() == 0
    w64 = torch.randn(2, k + 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1)).float().double()
    keep = torch.ones(2, k + 2, dtype=torch.bool)
    keep[0, :k] = False
    keep[1, k:] = False
    ref0 = torch.linalg.solve(a64[:k, :k], w64[0, :k])
    plain = refit_module.solve_mrp_block(w64.float(), a32, keep)  # RESIDUAL_TOL = 1e-4: no row redone
    monkeypatch.setattr(refit_module, "RESIDUAL_TOL", 0.0)
    calls = spy_solve(monkeypatch)
    z = refit_module.solve_mrp_block(w64.float(), a32, keep)
    assert calls == [(torch.float64, 1)]  # row 0 only
    assert torch.equal(z[1], plain[1]) and torch.equal(z[1, k:], (w64[1, k:] / 4).float())
    assert rel_err(z[0, :k], ref0) < 1e-6 < 1e-3 < rel_err(plain[0, :k], ref0)


# Fuzz: every method on random small layers


PATTERNS = ["2:4", "1:4", "4:8", 0.5]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(rows=st.integers(1, 16), groups=st.integers(1, 8), pattern=st.sampled_from(PATTERNS),
       method=st.sampled_from(METHODS), corr=st.floats(0.0, 3.0), tokens=st.sampled_from([4, 32, 256]),
       seed=st.integers(0, 2**16))
def test_fuzz_solvers(rows, groups, pattern, method, corr, tokens, seed):
    m = parse_sparsity(pattern).m or 4
    cols = min(groups * m, 64)
    w, _, h = correlated_layer(rows, cols, tokens, seed, corr)
    result = solve(w, h, pattern, method, blocksize=8 if m <= 8 else m)
    assert torch.isfinite(result.weight).all()
    assert meets(result.weight, pattern)
    assert (result.weight[~result.mask] == 0).all()
    if method in ("sparsegpt", "mrp-m", "mrp"):
        magnitude = solve(w, h, pattern, "magnitude")
        assert result.loss <= magnitude.loss * (1 + 1e-4) + 1e-9, (result.loss, magnitude.loss)


# ---- H overflow is not "NaN in the activations"; a singular H with enough tokens is said


def test_hessian_overflow_is_told_apart_from_nan_activations():
    import mrp_pass

    model = torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.Linear(16, 16))
    with torch.no_grad():
        model[0].weight.fill_(1e30)
    calib = [torch.randn(4, 16) for _ in range(2)]
    with pytest.raises(FloatingPointError) as e:
        mrp_pass.prune(model, calib, method="sparsegpt")
    msg = str(e.value)
    assert "overflowed" in msg and "activations are finite" in msg and "contain NaN" not in msg, msg
    assert torch.equal(model[0].weight, torch.full((16, 16), 1e30))  # rolled back
    calib[1][0, 3] = float("nan")
    with pytest.raises(FloatingPointError, match="contain NaN or Inf"):
        mrp_pass.prune(torch.nn.Sequential(torch.nn.Linear(16, 16)), calib, method="sparsegpt")


def test_singular_hessian_with_enough_tokens_is_warned():
    import mrp_pass

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(16, 8))
    base = torch.randn(64, 8)
    calib = [torch.cat([base, base], dim=1)]  # every feature duplicated: rank 8 of 16, with 64 tokens
    with pytest.warns(UserWarning, match=r"numerical rank 8 of 16 inputs"):
        report = mrp_pass.prune(model, calib, method="sparsegpt")
    assert any("near zero" in n for n in report.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # full-rank calibration: no warning
        mrp_pass.prune(torch.nn.Sequential(torch.nn.Linear(16, 8)), [torch.randn(64, 16)], method="sparsegpt")
