"""On a CUDA GPU (pytest -m gpu): each backend this GPU supports converts fp16 / bf16 2:4 weights and matches
dense; fp32 is cast or refused, never run as 2:4; the autotune's choice is applied per token count."""

import pytest
import torch

from runtime.torch_sparse import TorchSparseLinear, autotune, available_backends, plan, to_torch_sparse

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


def _capability():
    return torch.cuda.get_device_capability() if torch.cuda.is_available() else None


def _backends():
    cap = _capability()
    return available_backends(cap) if cap and cap >= (8, 0) else []


def _pruned(n_out, n_in, dtype):
    torch.manual_seed(0)
    w = torch.randn(n_out, n_in, device="cuda")
    keep = w.reshape(-1, 4).abs().topk(2, dim=1).indices
    mask = torch.zeros_like(w.reshape(-1, 4), dtype=torch.bool).scatter_(1, keep, True)
    return (w.reshape(-1, 4) * mask).reshape(n_out, n_in).to(dtype)


def test_backends_match_this_gpu():
    cap = _capability()
    backends = available_backends(cap)
    assert ("cutlass" in backends) == (cap[0] == 8)
    if cap >= (8, 0) and torch.backends.cusparselt.is_available():
        assert backends[0] == "cusparselt"


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["cusparselt", "cutlass"])
def test_each_supported_backend_matches_dense(backend, dtype):
    if backend not in _backends():
        pytest.skip(f"{backend} is not offered on compute capability {_capability()}")
    w, bias = _pruned(256, 512, dtype), torch.randn(256, device="cuda", dtype=dtype)
    entry = plan({"l": w}, capability=_capability(), dtype=dtype, backends=[backend])[0]
    assert entry.sparse and entry.backend == backend
    layer = TorchSparseLinear(w, bias, entry, {1: True})
    for tokens in (1, 8, 100, 1024):
        x = torch.randn(2, tokens, 512, device="cuda", dtype=dtype)
        ref = torch.nn.functional.linear(x.float(), w.float(), bias.float())
        got = layer(x)
        assert got.shape == ref.shape and got.dtype == dtype
        assert (got.float() - ref).norm() / ref.norm() < 2e-2


def test_mixed_layer_dispatches_per_token_count():
    if not _backends():
        pytest.skip("no semi-structured backend on this GPU")
    w = _pruned(256, 512, torch.float16)
    entry = plan({"l": w}, capability=_capability(), dtype=torch.float16)[0]
    layer = TorchSparseLinear(w, None, entry, {1: False, 128: True})
    assert layer.extra_bytes == w.numel() * 2 and layer.dense_weight is not None
    for tokens in (4, 300):
        x = torch.randn(tokens, 512, device="cuda", dtype=torch.float16)
        ref = x.float() @ w.float().t()
        assert (layer(x).float() - ref).norm() / ref.norm() < 2e-2


def test_autotune_measures_on_the_gpu():
    if not _backends():
        pytest.skip("no semi-structured backend on this GPU")
    w = _pruned(1024, 1024, torch.float16)
    choice = autotune(w, (1, 2048), backend=_backends()[0], cache={})
    assert set(choice.dense_ms) == {1, 2048} and all(v > 0 for v in choice.sparse_ms.values())


def test_fp32_model_is_cast_to_fp16_or_refused():
    if not _backends():
        pytest.skip("no semi-structured backend on this GPU")
    model = torch.nn.Sequential(torch.nn.Linear(512, 256)).cuda()
    with torch.no_grad():
        model[0].weight.copy_(_pruned(256, 512, torch.float32))
    with pytest.raises(ValueError, match="1:2"):
        to_torch_sparse(model, dtype=torch.float32)
    layers = to_torch_sparse(model, autotune=False)  # default dtype: fp16
    assert layers[0].dtype == "float16" and layers[0].sparse
    assert isinstance(model[0], TorchSparseLinear) and model[0].weight.dtype == torch.float16
    x = torch.randn(64, 512, device="cuda", dtype=torch.float16)
    assert model(x).dtype == torch.float16
