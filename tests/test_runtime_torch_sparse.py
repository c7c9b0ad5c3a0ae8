"""torch-sparse engine: backends per GPU, the plan (dtype / shape / capability rules), the autotune's choice with a
fake timer, per-token-count dispatch, and the CUDA / dtype guards. Pure logic: no GPU needed."""

import pytest
import torch

from mrp_pass import Sparsity
from runtime.torch_sparse import (
    autotune,
    available_backends,
    bucket_choice,
    plan,
    require_sparse_cuda,
    summary,
    to_torch_sparse,
)


def _weights(dtype=torch.float16):
    torch.manual_seed(0)
    shapes = {"a": (64, 64), "small": (8, 64), "dense": (64, 8), "b": (32, 64)}
    out = {}
    for name, (rows, cols) in shapes.items():
        w = torch.randn(rows, cols)
        if name != "dense":
            w = w * Sparsity(n=2, m=4).mask(w.abs())
        out[name] = w.to(dtype)
    return out


def test_available_backends_follow_the_gpu():
    assert available_backends((8, 0), cusparselt=True) == ["cusparselt", "cutlass"]
    assert available_backends((9, 0), cusparselt=True) == ["cusparselt"]  # H100 / H200: no CUTLASS kernel
    assert available_backends((9, 0), cusparselt=False) == []
    assert available_backends((8, 6), cusparselt=False) == ["cutlass"]
    assert available_backends(None, cusparselt=True) == []


def test_plan_on_hopper_uses_cusparselt_and_explains_dense():
    layers = {e.name: e for e in plan(_weights(), capability=(9, 0), backends=["cusparselt", "cutlass"])}
    assert layers["a"].sparse and layers["a"].backend == "cusparselt" and layers["a"].dtype == "float16"
    assert not layers["small"].sparse and "16x16" in layers["small"].reason and "8.x" in layers["small"].reason
    assert layers["dense"].reason == "not 2:4"
    assert layers["b"].sparse and layers["b"].backend == "cusparselt"
    forced = {e.name: e for e in plan(_weights(), capability=(9, 0), backends=["cutlass"])}
    assert not forced["a"].sparse and "8.x" in forced["a"].reason


def test_plan_on_ampere_falls_back_per_layer_to_cutlass():
    w = {"x": _weights()["a"]}
    assert plan(w, capability=(8, 0), backends=["cutlass"])[0].backend == "cutlass"
    # 32x64 bf16 passes both; CUTLASS needs 32x64 multiples, so 48x16 only runs on cuSPARSELt
    w48 = torch.randn(48, 16)
    w48 = (w48 * Sparsity(n=2, m=4).mask(w48.abs())).half()
    entry = plan({"y": w48}, capability=(8, 0), backends=["cutlass", "cusparselt"])[0]
    assert entry.sparse and entry.backend == "cusparselt"


def test_plan_never_runs_fp32_as_2_4():
    layers = plan(_weights(torch.float32), capability=(8, 0), dtype=torch.float32, backends=["cusparselt", "cutlass"])
    by = {e.name: e for e in layers}
    assert not any(e.sparse for e in layers)
    assert "1:2" in by["a"].reason and "float16" in by["a"].reason
    # the same fp32 weights planned for the engine's fp16 cast are eligible
    assert plan(_weights(torch.float32), capability=(8, 0), dtype=torch.float16,
                backends=["cutlass"])[0].sparse


def test_plan_without_a_sparse_gpu():
    for cap, word in [(None, "no CUDA"), ((7, 5), "7.5")]:
        layers = plan(_weights(), capability=cap, backends=["cusparselt"])
        assert not any(e.sparse for e in layers) and word in layers[0].reason
    assert "no semi-structured backend" in plan(_weights(), capability=(9, 0), backends=[])[0].reason
    s = summary(plan(_weights(), capability=(9, 0), backends=["cusparselt"]))
    assert (s["sparse"], s["dense"], s["mixed"], s["extra_bytes"]) == (2, 2, 0, 0)


class FakeTimer:
    """Dense costs 1 ms per 100 tokens + 0.02 ms; sparse has a fixed 0.2 ms overhead and runs 1.5x faster after."""

    def __init__(self):
        self.calls = []

    def __call__(self, variant, tokens):
        self.calls.append((variant, tokens))
        if variant == "dense":
            return 0.02 + tokens / 100
        return 0.2 + tokens / 150


def test_autotune_keeps_sparse_only_where_faster_and_caches():
    cache, timer = {}, FakeTimer()
    w = _weights()["a"]
    choice = autotune(w, (1, 16, 128, 2048), timer=timer, backend="cusparselt", device_name="fake", cache=cache)
    assert choice.sparse == {1: False, 16: False, 128: True, 2048: True}
    assert choice.mode == "mixed"
    assert choice.gain()[2048] == pytest.approx((0.02 + 20.48) / (0.2 + 2048 / 150))
    assert choice.gain()[1] < 1
    assert len(timer.calls) == 8
    # same shape / dtype / backend / device: from the cache, no timing at all
    again = autotune(torch.zeros_like(w), (1, 2048), timer=lambda *a: pytest.fail("timed twice"),
                     backend="cusparselt", device_name="fake", cache=cache)
    assert again.sparse == {1: False, 2048: True}
    # another GPU (or backend, or dtype) is another key: timed again
    autotune(w, (1,), timer=timer, backend="cusparselt", device_name="other", cache=cache)
    autotune(w.bfloat16(), (1,), timer=timer, backend="cusparselt", device_name="fake", cache=cache)
    assert len(timer.calls) == 12


def test_autotune_needs_a_clear_win():
    # sparse 2% faster everywhere: inside the 3% noise margin, so dense is kept ("never slower than dense")
    choice = autotune(_weights()["a"], (1, 128), timer=lambda v, n: 0.98 if v == "sparse" else 1.0,
                      backend="cutlass", device_name="fake", cache={})
    assert choice.mode == "dense"
    choice = autotune(_weights()["a"], (1, 128), timer=lambda v, n: 0.5 if v == "sparse" else 1.0,
                      backend="cutlass", device_name="fake", cache={})
    assert choice.mode == "sparse"


def test_dispatch_uses_the_largest_bucket_at_or_below_the_token_count():
    use = {1: False, 16: False, 128: True, 2048: True}
    assert [bucket_choice(use, n) for n in (1, 8, 16, 127, 128, 500, 8192)] == \
        [False, False, False, False, True, True, True]
    assert bucket_choice({16: True, 128: False}, 1) is True  # below every bucket: the smallest one decides


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_conversion_needs_cuda():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64)).half()
    with pytest.raises(RuntimeError, match="compute capability"):
        to_torch_sparse(model)


def test_fp32_is_refused_or_cast_never_run_as_2_4():
    model = torch.nn.Sequential(torch.nn.Linear(64, 64))
    with pytest.raises(ValueError, match="1:2"):
        to_torch_sparse(model, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"dtype=torch\.float16"):
        to_torch_sparse(model, dtype=None)  # keep the model's dtype: it is fp32
    assert model[0].weight.dtype == torch.float32  # refused before touching the model


def test_capability_guard():
    with pytest.raises(RuntimeError, match=r"7\.5"):
        require_sparse_cuda((7, 5))
    require_sparse_cuda((8, 0))
    require_sparse_cuda((9, 0))
