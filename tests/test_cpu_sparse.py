"""runtime.cpu_sparse: the AVX2 2:4 kernel against the plain-PyTorch reference and dense F.linear, the packing
formats, the dense fallback, torch.compile / torch.export, and sparsify_cpu on a tiny Llama."""

import warnings

import pytest
import torch
import torch.nn.functional as F
from helpers import rand_24
from tiny_models import mask_24
from torch import nn

from runtime import cpu_sparse as cs


@pytest.fixture(scope="module")
def kernel():
    ok, reason = cs.kernel_available()
    if not ok:
        pytest.skip(f"cpu-sparse kernel unavailable: {reason}")
    return True


@pytest.fixture
def threads():
    old = torch.get_num_threads()
    yield torch.set_num_threads
    torch.set_num_threads(old)


@pytest.fixture
def dense_threshold(kernel):
    """Set the row count from which the op decompresses and calls the dense GEMM; restored afterwards."""
    old = []

    def set_(rows: int) -> None:
        prev = torch.ops.mrp.sparse24_set_dense_threshold(rows)
        if not old:
            old.append(prev)

    yield set_
    if old:
        torch.ops.mrp.sparse24_set_dense_threshold(old[0])


def op(x, packed, bias=None):
    return torch.ops.mrp.sparse24_linear(x, packed.values, packed.positions, bias, packed.out_features,
                                         packed.in_features, packed.scales)


def close(a, b, in_features):
    # fp32 sums of in/2 products of N(0, 1) values in a different order: errors ~ eps * sqrt(in)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=2e-6 * in_features**0.5)


# ----------------------------------------------------------------------------------------------------------------
# packing


@pytest.mark.parametrize("shape", [(1, 4), (13, 20), (8, 64), (37, 132), (100, 1028)])
def test_pack_unpack_round_trip(shape):
    w = rand_24(*shape)
    w[0, :4] = torch.tensor([0.0, 0.0, 3.0, 0.0])  # a group with one non-zero
    w[-1, -4:] = 0  # and an empty one
    packed = cs.pack(w)
    assert torch.equal(cs.unpack(packed), w)
    blocks = -(-shape[0] // cs.ROWS)
    assert packed.values.shape == (blocks, shape[1] // 4, 16) and packed.positions.dtype == torch.int32
    assert packed.nbytes == blocks * cs.ROWS * shape[1] // 2 * 4 + blocks * shape[1] // 4 * 4
    half = cs.pack(w, torch.float16)
    assert half.values.dtype == torch.float16 and torch.equal(cs.unpack(half), w.half())


def test_pack_errors():
    w = rand_24(16, 32)
    w[3, 9] = w[3, 8] = w[3, 10] = 1.0  # 3 non-zeros in inputs 8..11 of row 3
    with pytest.raises(ValueError, match=r"not 2:4.*row 3, inputs 8\.\.11"):
        cs.pack(w)
    with pytest.raises(ValueError, match="multiple of 4"):
        cs.pack(torch.zeros(8, 30))
    with pytest.raises(ValueError, match="2-D"):
        cs.pack(torch.zeros(32))
    with pytest.raises(ValueError, match="value_dtype"):
        cs.pack(rand_24(8, 8), torch.float64)


@pytest.mark.parametrize("shape", [(13, 20), (16, 64), (37, 132)])
def test_pack_bitmask_equals_pack(shape):
    """compressed-tensors' tensors as export/compressed.py writes them -> the same layout as pack on the weight."""
    from export.compressed import compress_24

    w = rand_24(*shape, seed=1)  # exactly 2 non-zeros per group: the kept positions are unambiguous
    parts = compress_24(w)
    a, b = cs.pack(w), cs.pack_bitmask(parts["compressed"], parts["bitmask"], parts["shape"])
    assert torch.equal(a.values, b.values) and torch.equal(a.positions, b.positions)
    assert (b.out_features, b.in_features) == shape
    w[2, 4:8] = torch.tensor([0.0, -1.5, 0.0, 0.0])  # fewer non-zeros: zero fillers may sit elsewhere
    w[5, :4] = 0
    parts = compress_24(w)
    packed = cs.pack_bitmask(parts["compressed"], parts["bitmask"], tuple(shape), torch.bfloat16)
    assert packed.values.dtype == torch.bfloat16 and torch.equal(cs.unpack(packed), w.bfloat16())


def test_pack_bitmask_errors():
    from export.compressed import compress_24

    parts = compress_24(rand_24(8, 16))
    bad = parts["bitmask"].clone()
    bad[3, 0] = 0b00010111  # inputs 0..3 of row 3 keep 3
    with pytest.raises(ValueError, match=r"row 3, inputs 0\.\.3 keeps 3"):
        cs.pack_bitmask(parts["compressed"], bad, parts["shape"])
    with pytest.raises(ValueError, match="values"):
        cs.pack_bitmask(parts["compressed"][:, :4], parts["bitmask"], parts["shape"])
    with pytest.raises(ValueError, match="bitmask"):
        cs.pack_bitmask(parts["compressed"], parts["bitmask"][:, :1], parts["shape"])


def test_pack_bitmask_from_saved_checkpoint(tmp_path, kernel):
    """A tiny Llama's linears as save_compressed writes them to disk -> SparseLinear.from_bitmask == the layer."""
    from safetensors.torch import load_file
    from tiny_models import tiny_llama

    from export.compressed import save_compressed

    model = tiny_llama()
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, nn.Linear):
                mod.weight.copy_(mod.weight * mask_24(mod.weight))
    save_compressed(model, tmp_path / "ckpt")
    tensors = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    for name in ("model.layers.0.self_attn.k_proj", "model.layers.1.mlp.down_proj"):
        linear = model.get_submodule(name)
        x = torch.randn(3, linear.in_features)
        sl = cs.SparseLinear.from_bitmask(tensors[f"{name}.compressed"], tensors[f"{name}.bitmask"],
                                          tensors[f"{name}.shape"], linear.bias)
        assert torch.equal(cs.unpack(sl.packed), linear.weight.detach())
        close(sl(x), linear(x).detach(), linear.in_features)


# ----------------------------------------------------------------------------------------------------------------
# the kernel


SHAPES = [(13, 20), (8, 4), (37, 132), (64, 64), (100, 1028), (44, 580)]


@pytest.mark.parametrize("n_threads", [1, 2])
@pytest.mark.parametrize("shape", SHAPES)
def test_kernel_matches_reference_and_dense(shape, n_threads, kernel, threads):
    threads(n_threads)
    out_f, in_f = shape
    w = rand_24(out_f, in_f, seed=out_f)
    bias = torch.randn(out_f)
    packed = cs.pack(w)
    for rows in [*range(1, 18), 64, 200]:
        x = torch.randn(rows, in_f)
        for b in (None, bias):
            y = op(x, packed, b)
            assert y.shape == (rows, out_f) and y.dtype == torch.float32
            close(y, cs.reference_linear(x, packed, b), in_f)
            close(y, F.linear(x, w, b), in_f)


@pytest.mark.parametrize("value_dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("n_threads", [1, 2])
def test_kernel_16bit_values(value_dtype, n_threads, kernel, threads):
    """16-bit values, fp32 products and sums: equal to the reference on the same rounded values."""
    threads(n_threads)
    for out_f, in_f in [(13, 20), (37, 132), (300, 516)]:
        w = rand_24(out_f, in_f, seed=in_f)
        packed = cs.pack(w, value_dtype)
        bias = torch.randn(out_f)
        for rows in (1, 2, 5, 7, 17, 64, 200):
            x = torch.randn(rows, in_f)
            close(op(x, packed, bias), cs.reference_linear(x, packed, bias), in_f)
            close(op(x, packed), F.linear(x, w.to(value_dtype).float()), in_f)


def test_dense_gemm_path_matches(kernel, dense_threshold):
    """Both sides of the prefill threshold (sparse kernel vs decompress + dense GEMM) give the same numbers."""
    w, bias = rand_24(37, 132), torch.randn(37)
    for value_dtype in cs.VALUE_DTYPES:
        packed = cs.pack(w, value_dtype)
        x = torch.randn(70, 132)
        dense_threshold(1 << 30)
        sparse = op(x, packed, bias)
        dense_threshold(1)
        dense = op(x, packed, bias)
        close(sparse, dense, 132)
        close(dense, cs.reference_linear(x, packed, bias), 132)


def test_leading_dims_noncontiguous_and_dtypes(kernel):
    w, bias = rand_24(21, 36), torch.randn(21)
    packed = cs.pack(w)
    x = torch.randn(2, 3, 5, 36)
    close(op(x, packed, bias), F.linear(x, w, bias), 36)
    xt = torch.randn(36, 7).t()  # non-contiguous rows
    assert not xt.is_contiguous()
    close(op(xt, packed, bias), F.linear(xt, w, bias), 36)
    xs = torch.randn(4, 72)[:, ::2]  # strided last dim
    close(op(xs, packed), F.linear(xs, w), 36)
    x1 = torch.randn(36)  # a single vector
    close(op(x1, packed, bias), F.linear(x1, w, bias), 36)
    xb = torch.randn(3, 36).bfloat16()  # 16-bit activations: computed in fp32, returned in x's dtype
    yb = op(xb, packed, bias)
    assert yb.dtype == torch.bfloat16
    close(yb, F.linear(xb.float(), w, bias).bfloat16(), 36)
    assert op(torch.randn(0, 36), packed).shape == (0, 21)
    with pytest.raises(RuntimeError, match="last dim"):
        op(torch.randn(2, 40), packed)


def test_threads_really_run_in_parallel(kernel, threads):
    """at::parallel_for inside the extension only forks when it was compiled with OpenMP (-fopenmp)."""
    threads(2)
    assert torch.ops.mrp.sparse24_parallel_threads() == 2
    threads(1)
    assert torch.ops.mrp.sparse24_parallel_threads() == 1


# ----------------------------------------------------------------------------------------------------------------
# modules, fallback, compile / export


def test_sparse_linear_module(kernel):
    lin = nn.Linear(132, 37)
    with torch.no_grad():
        lin.weight.copy_(lin.weight * mask_24(lin.weight))
    sl = cs.SparseLinear.from_linear(lin)
    x = torch.randn(2, 4, 132)
    close(sl(x), lin(x).detach(), 132)
    assert "float32" in repr(sl) and f"weight bytes={sl.weight_nbytes()}" in repr(sl)
    assert set(sl.state_dict()) == {"values", "positions", "bias"}
    assert sl.weight_nbytes() == 40 * 66 * 4 + 5 * 33 * 4  # 37 rows padded to 5 blocks of 8
    half = cs.SparseLinear.from_linear(lin, torch.float16)
    assert "float16" in repr(half) and half.weight_nbytes() == 40 * 66 * 2 + 5 * 33 * 4
    square = cs.SparseLinear(cs.pack(rand_24(64, 128)))
    assert square.weight_nbytes() / (64 * 128 * 4) == pytest.approx(8.5 / 16)
    nobias = nn.Linear(132, 37, bias=False)
    with torch.no_grad():
        nobias.weight.copy_(lin.weight)
    close(cs.SparseLinear.from_linear(nobias)(x), nobias(x).detach(), 132)


def test_fallback_warns_once_same_numbers(monkeypatch):
    w, bias = rand_24(37, 132), torch.randn(37)
    sl = cs.SparseLinear(cs.pack(w), bias)
    x = torch.randn(5, 132)
    monkeypatch.setattr(cs, "_STATUS", (False, "no AVX2 (test)"))
    monkeypatch.setattr(cs, "_WARNED", False)
    assert cs.kernel_available() == (False, "no AVX2 (test)")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ys = [sl(x) for _ in range(3)]
    msgs = [str(c.message) for c in caught if "cpu-sparse" in str(c.message)]
    assert len(msgs) == 1 and "no AVX2 (test)" in msgs[0]
    for y in ys:
        close(y, F.linear(x, w, bias), 132)


def test_missing_requirement_reasons(monkeypatch):
    monkeypatch.setattr(cs, "_cpu_flags", lambda: {"avx", "fma", "f16c"})
    assert "avx2" in cs._missing_requirement()
    monkeypatch.setattr(cs, "_cpu_flags", lambda: {"avx2", "fma", "f16c"})
    monkeypatch.setenv("CXX", "no-such-compiler-xyz")
    assert "no C++ compiler" in cs._missing_requirement()


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.setenv("MRP_TRT_CACHE", str(tmp_path))
    assert cs.cache_dir().parent == tmp_path and cs.cache_dir().name.startswith("ext-")


class _TwoLayers(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = cs.SparseLinear(cs.pack(rand_24(24, 36, seed=3)), torch.randn(24))
        self.b = cs.SparseLinear(cs.pack(rand_24(10, 24, seed=4), torch.float16))

    def forward(self, x):
        return self.b(torch.relu(self.a(x)))


def _reference_two_layers(m, x):
    h = torch.relu(cs.reference_linear(x, m.a.packed, m.a.bias))
    return cs.reference_linear(h, m.b.packed)


def test_torch_export(kernel):
    m, x = _TwoLayers(), torch.randn(3, 36)
    ep = torch.export.export(m, (x,))
    targets = [n.target for n in ep.graph.nodes if n.op == "call_function"]
    assert targets.count(torch.ops.mrp.sparse24_linear.default) == 2
    close(ep.module()(x), _reference_two_layers(m, x), 36)


def test_torch_compile_inductor(kernel):
    torch._dynamo.reset()
    m, x = _TwoLayers(), torch.randn(3, 36)
    compiled = torch.compile(m, backend="inductor", fullgraph=True)
    with torch.no_grad():
        close(compiled(x), _reference_two_layers(m, x), 36)


def test_sparsify_tiny_llama(kernel):
    from tiny_models import tiny_llama

    model = tiny_llama()
    with torch.no_grad():
        for name, mod in model.named_modules():
            if isinstance(mod, nn.Linear) and name != "lm_head":
                mod.weight.copy_(mod.weight * mask_24(mod.weight))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        dense_logits = model(ids).logits
        dense_tokens = model.generate(ids[:1], do_sample=False, max_new_tokens=12, min_new_tokens=12)
    report = dict(cs.sparsify_cpu(model, filter=lambda name, mod: "v_proj" not in name))
    assert report["lm_head"] == "not 2:4"
    assert report["model.layers.0.self_attn.v_proj"] == "excluded by filter"
    assert sum(r == "sparse" for r in report.values()) == 12
    assert isinstance(model.model.layers[1].mlp.down_proj, cs.SparseLinear)
    assert isinstance(model.model.layers[1].self_attn.v_proj, nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, dense_logits, rtol=1e-4, atol=1e-4)
        tokens = model.generate(ids[:1], do_sample=False, max_new_tokens=12, min_new_tokens=12)
    assert torch.equal(tokens, dense_tokens)


def test_sparsify_tied_lm_head_stays_dense(kernel):
    from tiny_models import tiny_llama

    model = tiny_llama(tie=True)
    with torch.no_grad():
        head = model.lm_head.weight
        head.copy_(head * mask_24(head))  # 2:4, but shared with the embedding
    report = dict(cs.sparsify_cpu(model))
    assert report["lm_head"].startswith("weight tied")
    assert report["model.layers.0.mlp.up_proj"] == "not 2:4"
