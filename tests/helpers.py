"""What several test files need and would otherwise each write again: calibration data, weight snapshots, bitwise
comparison, random 2:4 weights and synthetic layer problems. Models are in tiny_models.py."""

import torch
from tiny_models import VOCAB, mask_24
from torch import nn


def token_windows(n: int = 4, seqlen: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """n [1, seqlen] windows of token ids below tiny_models.VOCAB, seeded: calibration for the tiny Llama."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, VOCAB, (1, seqlen), generator=gen) for _ in range(n)]


def feature_batches(n: int = 4, rows: int = 32, width: int = 16, seed: int = 1) -> list[torch.Tensor]:
    """n [rows, width] standard-normal batches, seeded: calibration for a model that takes features."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(rows, width, generator=gen) for _ in range(n)]


def linear_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of every nn.Linear's weight, by module name (a copy: the pass writes weights in place)."""
    return {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    """A copy of the whole state dict, for assert_same_bits after something that should leave the model alone."""
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def bits(t: torch.Tensor, fold_zero: bool = False) -> torch.Tensor:
    """A float tensor viewed as integers of its width, so equality is bitwise (NaN payloads and -0.0 count).
    fold_zero: -0.0 read as +0.0, for formats that store no pruned entries and so cannot keep a zero's sign."""
    if not t.is_floating_point():
        return t
    t = t.detach() + 0 if fold_zero else t.detach()
    return t.view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def assert_same_bits(a: nn.Module | dict, b: nn.Module | dict, fold_zero: bool = False) -> None:
    """Same keys, dtypes and bits in two models or state dicts (see `bits` for fold_zero)."""
    sa = a.state_dict() if isinstance(a, nn.Module) else a
    sb = b.state_dict() if isinstance(b, nn.Module) else b
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(bits(sa[k], fold_zero), bits(sb[k], fold_zero)), k


def rand_24(out_features: int, in_features: int, seed: int = 0, dtype=torch.float32, device="cpu") -> torch.Tensor:
    """A seeded standard-normal weight, magnitude-pruned to 2:4 along its inputs."""
    w = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(seed))
    return (w * mask_24(w)).to(dtype=dtype, device=device)


def correlated_layer(rows: int = 8, cols: int = 32, tokens: int = 128, seed: int = 0, corr: float = 0.5):
    """A layer problem: (W [rows, cols], X [tokens, cols] with correlated features, H = 2/N X^T X), seeded.
    Correlated inputs are what separates the solvers (with white inputs every mask rule is about as good)."""
    gen = torch.Generator().manual_seed(seed)
    mix = torch.eye(cols) + corr * torch.randn(cols, cols, generator=gen) / cols**0.5
    x = torch.randn(tokens, cols, generator=gen) @ mix
    return torch.randn(rows, cols, generator=gen), x, 2 * x.T @ x / tokens


def export_args(src, fmt: str, out, *extra) -> list[str]:
    """`mrp export` arguments for a model directory, with a short ONNX sequence length."""
    return ["export", "--model", str(src), "--format", fmt, "--out", str(out), "--seqlen", "8", *extra]
