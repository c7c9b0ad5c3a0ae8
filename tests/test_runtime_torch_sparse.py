"""torch-sparse engine: which layers convert (backend per dtype / shape rules), dense fallback reasons, CUDA guard."""

import pytest
import torch

from mrp_pass import Sparsity
from runtime.torch_sparse import plan, require_sparse_cuda, summary, to_torch_sparse


def _model(dtype):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 8), torch.nn.Linear(8, 64),
                                torch.nn.Linear(64, 32)).to(dtype)
    with torch.no_grad():
        for i in (0, 1, 3):
            w = model[i].weight
            w.mul_(Sparsity(n=2, m=4).mask(w.abs().float()).to(dtype))
    return model


def test_plan_fp16_prefers_cusparselt_and_explains_dense():
    layers = {e.name: e for e in plan(_model(torch.float16), ["cusparselt", "cutlass"])}
    assert layers["0"].sparse and layers["0"].backend == "cusparselt"
    assert not layers["1"].sparse and "cusparselt" in layers["1"].reason and "cutlass" in layers["1"].reason
    assert layers["2"].reason == "not 2:4"
    # 32 rows x 64 cols: cuSPARSELt rules pass (multiples of 16)
    assert layers["3"].sparse and layers["3"].backend == "cusparselt"


def test_plan_falls_back_per_layer_to_cutlass():
    layers = {e.name: e for e in plan(_model(torch.float32), ["cusparselt", "cutlass"])}
    assert layers["0"].backend == "cutlass"  # fp32: no cuSPARSELt kernel, CUTLASS has one
    only = {e.name: e for e in plan(_model(torch.float32), ["cusparselt"])}
    assert not only["0"].sparse and "float32" in only["0"].reason
    s = summary(list(layers.values()))
    assert s["sparse"] + s["dense"] == 4


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_conversion_needs_cuda():
    with pytest.raises(RuntimeError, match="compute capability"):
        to_torch_sparse(_model(torch.float16))


def test_capability_guard():
    with pytest.raises(RuntimeError, match=r"7\.5"):
        require_sparse_cuda((7, 5))
    require_sparse_cuda((8, 0))
    require_sparse_cuda((9, 0))
