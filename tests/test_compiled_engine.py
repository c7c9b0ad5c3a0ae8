"""The compiled CPU engine: int8 / half kernels, the static-cache decoder against transformers, the .pt2 package
(build, load without compiling, generate), `mrp export --format pt2` and the cached `engine="cpu-compiled"`."""

import json
import time
import zipfile

import pytest
import torch
import torch.nn.functional as F
from helpers import rand_24
from tiny_models import VOCAB, prune_24, tiny_llama

from runtime import cpu_sparse as cs

pytestmark = pytest.mark.skipif(not cs.kernel_available()[0], reason="the 2:4 kernel extension cannot build here")


def close(a, b, scale):
    assert (a - b).abs().max().item() <= 1e-4 * (1 + scale), (a - b).abs().max().item()


@pytest.mark.parametrize("rows", [1, 3, 4, 9, 70])
def test_int8_values_match_their_dequantized_weight(rows):
    """int8 2:4 values with per-row scales: the kernel equals F.linear on the dequantized weight, and the weight is
    the original within half a quantization step per row."""
    w, bias = rand_24(37, 132), torch.randn(37)
    packed = cs.pack(w, torch.int8)
    deq = cs.unpack(packed)
    step = w.abs().amax(1, keepdim=True) / 127
    assert ((deq - w).abs() <= step / 2 + 1e-7).all()
    assert ((deq != 0) == (w != 0)).all()  # same positions kept (no kept value rounds to 0 here)
    x = torch.randn(rows, 132)
    y = cs.sparse24_linear(x, packed, bias)
    close(y, F.linear(x, deq, bias), F.linear(x.abs(), deq.abs()).max().item())
    with pytest.raises(RuntimeError, match="int8 values need per-row scales"):
        torch.ops.mrp.sparse24_linear(x, packed.values, packed.positions, bias, 37, 132)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.int8])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 33])
def test_dense_linear_matches_f_linear(dtype, rows):
    """mrp::dense_linear (the head): GEMV for <= 4 rows, chunked GEMM beyond, odd widths with a scalar tail."""
    w, bias = torch.randn(1030, 76), torch.randn(1030)
    layer = cs.DenseLinear(w, dtype, bias)
    x = torch.randn(rows, 76)
    close(layer(x), F.linear(x, layer.dequantized(), bias), F.linear(x.abs(), w.abs()).max().item())
    tokens = torch.tensor([[0, 5, 1029]])
    assert torch.equal(layer.lookup(tokens), layer.dequantized()[tokens])


def test_dense_weight_dispatch_by_token_count():
    """With a dense copy and dense_from_rows, fewer rows run the kernel and more run the dense weight (a zeroed
    dense copy shows which ran)."""
    w, bias = rand_24(24, 64), torch.randn(24)
    packed = cs.pack(w)
    zero = torch.zeros(24, 64)

    def run(rows):
        x = torch.randn(rows, 64)
        return x, torch.ops.mrp.sparse24_linear(x, packed.values, packed.positions, bias, 24, 64, None, zero, 8)

    x, y = run(7)
    close(y, F.linear(x, w, bias), 64)
    _, y = run(8)
    assert torch.equal(y, bias.expand_as(y))


def _tiny(kind="llama", tie=False):
    import transformers

    if kind == "llama":
        model = tiny_llama(tie=tie)
    else:  # Qwen2: biases on q/k/v
        torch.manual_seed(0)
        cfg = transformers.Qwen2Config(hidden_size=64, num_hidden_layers=2, intermediate_size=128, vocab_size=VOCAB,
                                       num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                       tie_word_embeddings=tie)
        model = transformers.Qwen2ForCausalLM(cfg).eval()
    return prune_24(model)


@pytest.mark.parametrize("kind,tie", [("llama", False), ("llama", True), ("qwen2", False)])
def test_decoder_matches_transformers(kind, tie):
    """Decoder.from_hf in fp32 gives transformers' logits: the whole prompt at once, then token by token from the
    cache (GQA, tied / untied head, q/k/v biases)."""
    from runtime.decoder import from_hf

    model = _tiny(kind, tie)
    ids = torch.randint(0, VOCAB, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ref = model(ids).logits
        decoder, report = from_hf(model, torch.float32, max_seq_len=32, all_logits=True)
        assert report.sparse == len(report.layers) == 8 and report.tied == tie
        close(decoder(ids[:, :7], torch.empty(7)), ref[:, :7], ref.abs().max().item())
        for t in range(7, 12):  # continue the same sequence one token at a time
            close(decoder(ids[:, t : t + 1], torch.empty(t + 1))[:, -1], ref[:, t], ref.abs().max().item())


def test_decoder_keeps_layers_that_are_not_24_dense():
    from runtime.decoder import from_hf

    model = _tiny()
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight.normal_()
        ids = torch.randint(0, VOCAB, (1, 9))
        decoder, report = from_hf(model, torch.float32, max_seq_len=16, all_logits=True)
        ref = model(ids).logits
        close(decoder(ids, torch.empty(9)), ref, ref.abs().max().item())
    assert dict(report.layers)["layers.1.down_proj"] == "dense: not 2:4" and report.sparse == 7


def test_decoder_refuses_what_it_cannot_run():
    import transformers

    from runtime.decoder import from_hf

    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=VOCAB))
    with pytest.raises(ValueError, match=r"LLaMA family.*engine='cpu-sparse'"):
        from_hf(gpt2)
    with pytest.raises(ValueError, match="max_position_embeddings 64"):
        from_hf(_tiny(), max_seq_len=65)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One tiny .pt2 (fp32 values), compiled once for the tests below: (path, the model, compile seconds)."""
    from runtime.compiled import build_pt2

    model = _tiny()
    path = tmp_path_factory.mktemp("pt2") / "tiny.pt2"
    start = time.perf_counter()
    build_pt2(model, path, values=torch.float32, max_seq_len=48, dispatch=False)  # every 2:4 layer on the kernel
    return path, model, time.perf_counter() - start


def test_pt2_generates_the_eager_models_tokens(built, monkeypatch):
    """The package loads without compiling anything and greedy-decodes the pruned model's own tokens."""
    import runtime

    path, model, _ = built

    def no_compile(*args, **kwargs):
        raise AssertionError("loading a .pt2 must not compile")

    monkeypatch.setattr(torch._inductor, "aoti_compile_and_package", no_compile)
    lm = runtime.load(path)
    assert lm.kind == "cpu-compiled" and lm.meta["values"] == "float32" and lm.meta["sparse_linears"] == 8
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    result = lm.generate(prompt, max_new_tokens=20)
    with torch.no_grad():
        ref = model.generate(prompt, max_new_tokens=20, do_sample=False, min_new_tokens=20)[0, 6:].tolist()
    assert result.tokens == ref
    with torch.no_grad():  # a fresh prompt resets the sequence: the same logits as transformers' last position
        close(lm(prompt)[:, -1], model(prompt).logits[:, -1], 10.0)
    with pytest.raises(ValueError, match="exceeds the engine's max_seq_len 48"):
        lm.step(torch.zeros(1, 48, dtype=torch.int64))


def test_pt2_refuses_other_files_and_torch(built, tmp_path, monkeypatch):
    from runtime.compiled import CompiledLM, read_meta

    path, _, _ = built
    junk = tmp_path / "junk.pt2"
    junk.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"not a \.pt2 package"):
        CompiledLM(junk)
    foreign = tmp_path / "foreign.pt2"
    with zipfile.ZipFile(foreign, "w") as z:
        z.writestr("model/data.bin", b"x")
    with pytest.raises(ValueError, match="not written by the compiled CPU engine"):
        CompiledLM(foreign)
    meta = read_meta(path)
    assert meta["torch"] == torch.__version__ and json.dumps(meta)
    monkeypatch.setattr(torch, "__version__", "0.0.1")
    with pytest.raises(RuntimeError, match="run on the torch that built them"):
        CompiledLM(path)


def test_pt2_weights_are_loaded_once_not_copied(built, tmp_path):
    """The program runs on views of the one buffer the package's weights were read into (user-managed constants):
    resident memory never holds the weights twice. The weights' entry is aligned; a truncated package is refused."""
    from runtime.compiled import ALIGN, WEIGHTS, CompiledLM, _entry_data

    path, _, _ = built
    lm = CompiledLM(path)
    base = lm._weights.data_ptr()
    offset, size = _entry_data(path, WEIGHTS)
    assert offset % ALIGN == 0 and lm._weights.numel() == size
    stored = {n for n, e in lm.meta["weights"].items() if not e.get("zeros")}
    assert stored and any(e.get("zeros") for e in lm.meta["weights"].values())  # the KV cache: fresh zeros
    for name in stored:
        ptr = lm._constants[name].data_ptr()
        assert base <= ptr < base + size and (ptr - base) % ALIGN == 0, name
    data = path.read_bytes()
    cut = tmp_path / "cut.pt2"
    cut.write_bytes(data[: offset + size // 2] + data[offset + size:])  # the entry's second half lost
    with pytest.raises(ValueError, match=r"truncated|damaged|not a \.pt2"):
        CompiledLM(cut)


def test_export_pt2_cli_refuses_a_wrong_suffix_and_dtype(tiny_dir, tmp_path):
    from mrp_pass.cli import main

    assert main(["export", "--model", str(tiny_dir), "--format", "pt2", "--out", str(tmp_path / "m.bin")]) == 2
    assert main(["export", "--model", str(tiny_dir), "--format", "pt2", "--out", str(tmp_path / "x.pt2"),
                 "--dtype", "float64"]) == 2


@pytest.mark.slow  # two AOTInductor compiles (minutes on 2 cores); the `built` fixture's one covers the fast tier
def test_export_pt2_cli_and_cached_engine(tiny_dir, tmp_path, monkeypatch):
    """`mrp export --format pt2` on a pruned checkpoint, then runtime.load(dir, engine="cpu-compiled"): compiled once
    into the cache, reused by the next load, and both give the CLI package's tokens."""
    import transformers

    import runtime
    from mrp_pass.cli import main

    src = tmp_path / "pruned"
    prune_24(transformers.AutoModelForCausalLM.from_pretrained(tiny_dir)).save_pretrained(src)
    out = tmp_path / "m.pt2"
    assert main(["export", "--model", str(src), "--format", "pt2", "--out", str(out), "--dtype", "int8",
                 "--max-seq-len", "32"]) == 0
    prompt = torch.tensor([[3, 1, 4, 1, 5]])
    want = runtime.load(out).generate(prompt, 8).tokens
    monkeypatch.setenv("MRP_TRT_CACHE", str(tmp_path / "cache"))
    first = runtime.load(src, engine="cpu-compiled", dtype=torch.int8)
    assert any("compiled now" in n for n in first.notes)
    second = runtime.load(src, engine="cpu-compiled", dtype=torch.int8)
    assert any("reused" in n for n in second.notes) and second.path == first.path
    assert first.generate(prompt, 8).tokens == second.generate(prompt, 8).tokens
    assert first.meta["max_seq_len"] == 64  # the cache's default is capped at the model's positions
    assert first.meta["values"] == "int8" and want


def test_decoder_dispatch_per_token_count():
    """With dispatch, each fused 2:4 layer follows its measured plan (a fake clock here): a dense copy from the token
    count where dense won, dense where the kernel lost at one row; the logits stay transformers'."""
    from runtime.cpu_sparse import SparseLinear
    from runtime.decoder import from_hf

    model = _tiny()
    ids = torch.randint(0, VOCAB, (1, 20), generator=torch.Generator().manual_seed(4))

    def dense_wins_from(rows):
        return lambda layer, x: 1.0 if isinstance(layer, SparseLinear) else (2.0 if x.shape[0] < rows else 0.5)

    with torch.no_grad():
        ref = model(ids).logits
        decoder, report = from_hf(model, torch.float32, max_seq_len=32, all_logits=True,
                                  dispatch=dense_wins_from(16))
        assert report.sparse == 8 and all("dense copy from 16" in kind for _, kind in report.layers)
        mixed = [m for m in decoder.modules() if isinstance(m, SparseLinear)]
        assert len(mixed) == 8 and all(m.dense_from_rows == 16 for m in mixed)
        close(decoder(ids[:, :7], torch.empty(7)), ref[:, :7], ref.abs().max().item())  # the kernel
        decoder.reset()
        close(decoder(ids, torch.empty(20)), ref, ref.abs().max().item())  # 20 rows: the dense copies
        decoder, report = from_hf(model, torch.float32, max_seq_len=32, all_logits=True, dispatch=dense_wins_from(1))
        assert report.sparse == 0 and not any(isinstance(m, SparseLinear) for m in decoder.modules())
        close(decoder(ids, torch.empty(20)), ref, ref.abs().max().item())
