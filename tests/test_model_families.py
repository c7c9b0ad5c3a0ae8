"""Model families beyond Llama: T5 (encoder-decoder) prunes and keeps its cache settings, GPT-2 (Conv1D, weights
[in, out]) exports with every pruned layer verified, Mamba's report shows the dynamic axes its file has."""


import torch

from export import to_onnx

# ---- an encoder-decoder (T5) prunes: its decoder's own config has use_cache off too


def test_t5_prunes_and_its_cache_settings_are_restored():
    from transformers import T5Config, T5ForConditionalGeneration

    import mrp_pass

    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(d_model=32, d_ff=64, num_layers=1, num_heads=2, d_kv=16,
                                                vocab_size=64)).eval()
    caches = {id(m.config): m.config.use_cache for m in model.modules() if hasattr(m, "config")}
    calib = [dict(input_ids=torch.randint(0, 64, (1, 16)), decoder_input_ids=torch.randint(0, 64, (1, 8)))
             for _ in range(4)]
    report = mrp_pass.prune(model, calib, sparsity="2:4", method="sparsegpt")
    assert report.error is None and len(report.pruned) >= 4
    assert mrp_pass.is_nm_sparse(model.decoder.block[0].layer[-1].DenseReluDense.wo.weight)
    assert {id(m.config): m.config.use_cache for m in model.modules() if hasattr(m, "config")} == caches


# ---- GPT-2 (Conv1D, weights [in, out]): the report verifies and counts every pruned layer


def test_gpt2_onnx_report_verifies_and_counts_every_conv1d(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    import mrp_pass
    from export import eligibility

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64)).eval()
    calib = [torch.randint(0, 64, (1, 16)) for _ in range(4)]
    report = mrp_pass.prune(model, calib, sparsity="2:4", method="sparsegpt")
    assert len(report.pruned) == 4  # c_attn, attn.c_proj, c_fc, mlp.c_proj
    elig = eligibility(model)
    assert elig.counts()["linear"] == 5 and elig.counts()["2:4"] == 4  # the 4 Conv1D + lm_head (dense)
    assert "4/5 linear layers are 2:4" in elig.table()
    onnx_report = to_onnx(model, torch.randint(0, 64, (1, 8)), tmp_path / "gpt2.onnx")
    verified = [c for c in onnx_report.checks if c.layer and c.is_2_4]
    assert onnx_report.ok and len(onnx_report.pruned_layers) == 4 and len(verified) >= 4
    assert "4/4 pruned layers verified" in str(onnx_report)
    assert onnx_report.eligibility.counts()["2:4"] == 4


# ---- the dynamic axes reported are those of the written file (Mamba's sequence axis is fixed there)


def test_mamba_report_shows_the_axes_the_file_has(tmp_path):
    import onnx
    from transformers import MambaConfig, MambaForCausalLM

    torch.manual_seed(0)
    model = MambaForCausalLM(MambaConfig(hidden_size=32, num_hidden_layers=1, vocab_size=64, state_size=4)).eval()
    report = to_onnx(model, torch.randint(0, 64, (1, 8)), tmp_path / "mamba.onnx")
    dims = onnx.load(str(tmp_path / "mamba.onnx"), load_external_data=False).graph.input[0].type.tensor_type.shape.dim
    in_file = {i: d.dim_param for i, d in enumerate(dims) if d.dim_param}
    assert report.dynamic_axes == {"input_ids": in_file} and 1 not in in_file
    assert "input_ids[1] (seq)" in " ".join(report.notes) and "fixed in the file" in str(report)
