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
    """Dense costs 1 ms per 100 tokens + 0.02 ms; sparse has a fixed 0.2 ms overhead and runs 1.5x faster after,
    algorithm `a` of cuSPARSELt scaled by `alg_factor[a]` (inf: an id this library does not have)."""

    def __init__(self, alg_factor=None):
        self.calls = []
        self.alg_factor = alg_factor or {0: 1.0}

    def __call__(self, tokens, variants):
        self.calls.append((tokens, tuple(variants)))
        out = {}
        for v in variants:
            if v == "dense":
                out[v] = 0.02 + tokens / 100
            else:
                out[v] = (0.2 + tokens / 150) * self.alg_factor.get(int(v.split("@")[1]), float("inf"))
        return out


def test_autotune_keeps_sparse_only_where_faster_and_caches():
    cache, timer = {}, FakeTimer()
    w = _weights()["a"]
    choice = autotune(w, (1, 16, 128, 2048), timer=timer, backend="cutlass", device_name="fake", cache=cache)
    assert choice.sparse == {1: False, 16: False, 128: True, 2048: True}
    assert choice.mode == "mixed" and choice.alg == 0
    assert choice.gain()[2048] == pytest.approx((0.02 + 20.48) / (0.2 + 2048 / 150))
    assert choice.gain()[1] < 1
    # dense and sparse timed together (one interleaved session) per token count; CUTLASS has no algorithm search
    assert timer.calls == [(n, ("dense", "sparse@0")) for n in (1, 16, 128, 2048)]
    # same shape / dtype / bias / backend / device: from the cache, no timing at all
    again = autotune(torch.zeros_like(w), (1, 2048), timer=lambda *a: pytest.fail("timed twice"),
                     backend="cutlass", device_name="fake", cache=cache)
    assert again.sparse == {1: False, 2048: True}
    # another GPU, dtype or bias is another key: timed again
    autotune(w, (1,), timer=timer, backend="cutlass", device_name="other", cache=cache)
    autotune(w.bfloat16(), (1,), timer=timer, backend="cutlass", device_name="fake", cache=cache)
    autotune(torch.nn.Linear(64, 64).half(), (1,), timer=timer, backend="cutlass", device_name="fake", cache=cache)
    assert len(timer.calls) == 7


def test_cusparselt_algorithm_search_is_kept_only_where_it_helps():
    w = _weights()["a"]
    # algorithm 2 is 20% faster than the default everywhere; ids from 3 on do not exist in this library
    timer = FakeTimer({0: 1.0, 1: 1.1, 2: 0.8})
    choice = autotune(w, (1, 128, 2048), timer=timer, backend="cusparselt", device_name="fake", cache={})
    assert choice.alg == 2
    assert choice.sparse_ms[2048] == pytest.approx((0.2 + 2048 / 150) * 0.8)
    # searched once, at the largest token count, over every candidate id
    search = [c for c in timer.calls if len(c[1]) > 3]
    assert len(search) == 1 and search[0][0] == 2048 and "sparse@15" in search[0][1]
    # then each count re-timed with the chosen id beside the default, interleaved with dense
    assert (1, ("dense", "sparse@0", "sparse@2")) in timer.calls
    # the searched id wins at 2048 tokens but loses wherever else sparse runs: the default is kept
    class Crossing(FakeTimer):
        def __call__(self, tokens, variants):
            out = super().__call__(tokens, variants)
            if "sparse@1" in out:
                out["sparse@1"] = out["sparse@0"] * (0.9 if tokens == 2048 else 1.5)
            return out

    choice = autotune(w, (128, 512, 2048), timer=Crossing({0: 1.0, 1: 1.0}), backend="cusparselt",
                      device_name="fake", cache={})
    assert choice.alg == 0
    # no search when asked not to
    timer = FakeTimer({0: 1.0, 1: 0.5})
    assert autotune(w, (1, 2048), timer=timer, backend="cusparselt", device_name="fake", cache={},
                    search_alg=False).alg == 0
    assert all(len(v) == 2 for _, v in timer.calls)


def test_autotune_needs_a_clear_win():
    # sparse 2% faster everywhere: inside the 3% noise margin, so dense is kept ("never slower than dense")
    def timer(factor):
        return lambda n, variants: {v: (factor if v != "dense" else 1.0) for v in variants}

    choice = autotune(_weights()["a"], (1, 128), timer=timer(0.98), backend="cutlass", device_name="fake", cache={})
    assert choice.mode == "dense"
    choice = autotune(_weights()["a"], (1, 128), timer=timer(0.5), backend="cutlass", device_name="fake", cache={})
    assert choice.mode == "sparse"


class ColumnMajorProduct(torch.Tensor):
    """A stand-in for a semi-structured weight whose F.linear returns the transposed product as a view (torch < 2.12's
    cuSPARSELt without transpose_result, and CUTLASS), and whose algorithm ids past 2 fail like cuSPARSELt's."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.linear:
            x, w = args[0], args[1]
            if getattr(w, "alg_id_cusparselt", 0) > 2:
                raise RuntimeError("CUSPARSE_STATUS_INVALID_VALUE")
            bias = args[2] if len(args) > 2 else kwargs.get("bias")
            x2 = x.reshape(-1, x.shape[-1])
            out = (w.as_subclass(torch.Tensor) @ x2.t()).t()  # [tokens, out] with strides (1, tokens)
            if bias is not None:
                out = out + bias
            return out.view(*x.shape[:-1], -1)
        return super().__torch_function__(func, types, args, kwargs)


def test_sparse_outputs_are_row_major_whatever_the_kernel_returns(monkeypatch):
    import runtime.torch_sparse as ts

    w = _weights(torch.float32)["a"]
    monkeypatch.setattr(ts, "to_semi_structured", lambda weight, backend, alg=0: weight.clone().as_subclass(
        ColumnMajorProduct))
    entry = ts.LayerPlan("l", (64, 64), "float32", True, "cutlass", "ok", "sparse")
    layer = ts.TorchSparseLinear(w, None, entry)
    x = torch.randn(1, 5, 64)
    raw = torch.nn.functional.linear(x, layer.weight)
    assert raw.stride(-1) != 1  # what the kernel returns: attention would reject it for its fast kernels
    out = layer(x)
    assert out.shape == (1, 5, 64) and out.stride(-1) == 1 and out.is_contiguous()
    torch.testing.assert_close(out, torch.nn.functional.linear(x, w))


def test_cusparselt_weights_ask_for_the_fused_transpose(monkeypatch):
    import runtime.torch_sparse as ts

    class Packed:  # what from_dense returns: torch < 2.12 leaves fuse_transpose_cusparselt False
        fuse_transpose_cusparselt = False
        alg_id_cusparselt = 0

    monkeypatch.setattr(torch.sparse.SparseSemiStructuredTensorCUSPARSELT, "from_dense",
                        classmethod(lambda cls, w: Packed()))
    sparse = ts.to_semi_structured(_weights()["a"], "cusparselt", alg=3)
    assert sparse.fuse_transpose_cusparselt is True and sparse.alg_id_cusparselt == 3


def test_the_gpu_timer_interleaves_after_a_timed_warm_up_and_skips_missing_algorithms(monkeypatch):
    """cuda_event_timer's protocol on the CPU: CUDA events and synchronize replaced by the host clock."""
    import time

    import runtime.torch_sparse as ts

    class Event:
        def __init__(self, enable_timing=True):
            self.t = None

        def record(self):
            self.t = time.perf_counter()

        def synchronize(self):
            pass

        def elapsed_time(self, other):
            return (other.t - self.t) * 1000

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    w = _weights(torch.float32)["a"]
    sparse = w.clone().as_subclass(ColumnMajorProduct)
    sparse.alg_id_cusparselt = 0
    order = []
    real_linear = ts.sparse_linear

    def recording_sparse_linear(x, weight, bias=None):
        order.append(f"sparse@{weight.alg_id_cusparselt}")
        return real_linear(x, weight, bias)

    monkeypatch.setattr(ts, "sparse_linear", recording_sparse_linear)
    timer = ts.cuda_event_timer(w, sparse, warmup_s=0.05, calls=2, repeats=4)
    t0 = time.perf_counter()
    got = timer(8, ["sparse@1", "sparse@7", "sparse@0"])
    assert time.perf_counter() - t0 >= 0.05
    assert got["sparse@7"] == float("inf") and 0 < got["sparse@1"] < float("inf") and got["sparse@0"] > 0
    # after the warm-up, rounds alternate: 1,0 then 0,1 ...
    timed = order[-4 * 2 * 2:]
    rounds = [timed[i:i + 4] for i in range(0, len(timed), 4)]
    assert rounds[0] == ["sparse@1"] * 2 + ["sparse@0"] * 2 and rounds[1] == ["sparse@0"] * 2 + ["sparse@1"] * 2
    assert sparse.alg_id_cusparselt == 0  # the weight's own algorithm is restored


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
