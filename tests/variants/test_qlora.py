"""QLoRA and the quantized base (`lorafactory.quantize`, `model.quantize`): storage size, NF4's error bound and
codebook, the model at step 0, merging, memory on the training path, parity with PEFT on a bitsandbytes base, and
every other variant on a quantized base."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from conftest import batch_for, contract_config, skip_where_bnb_misplaces_partial_rows, tiny, tiny_cfg
from omegaconf import OmegaConf

from lorafactory import quantize
from lorafactory.errors import ConfigError, UserError
from lorafactory.models import build_model, unfreeze
from lorafactory.variants import VARIANTS, adapter_layers, adapter_parameters, build_variant, merge_adapters
from lorafactory.variants.base import find_targets, replace_module

# The NF4 code as QLoRA publishes it (Dettmers et al., 2023, appendix E): quantiles of N(0, 1), normalised to [-1, 1].
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ]
)


def logits(model, batch):
    with torch.no_grad():
        return model(**{k: v for k, v in batch.items() if k != "labels"}).logits


def perturb(model, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=g))


def dequantized_absmax(module) -> torch.Tensor:
    """The block scales a quantized module really uses (after double quantization)."""
    import bitsandbytes.functional as bnbf

    state = quantize.codec(module).state()
    return bnbf.dequantize_blockwise(state.absmax, state.state2) + state.offset


def test_minilm_sized_layers_take_under_three_tenths_of_their_fp32_bytes():
    torch.manual_seed(0)
    layers = [torch.nn.Linear(384, 384), torch.nn.Linear(384, 1536), torch.nn.Linear(1536, 384)]
    fp32 = sum(layer.weight.numel() * 4 for layer in layers)
    for layer in layers:
        quantize.quantize_(layer)
        assert quantize.is_quantized(layer) and layer.parametrizations.weight.original.dtype == torch.uint8
    stored = sum(quantize.storage_bytes(layer) for layer in layers)
    assert stored <= 0.3 * fp32
    # 4 bits per weight plus 8-bit scales per 64 and one float per 256 scales: 4.127 bits, 0.129 of fp32
    assert stored == pytest.approx(fp32 * 4.127 / 32, rel=0.01)


@pytest.mark.parametrize("double_quant", [False, True])
def test_nf4_round_trip_error_is_within_half_a_code_gap_of_each_block_scale(double_quant):
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 40)  # 3840 values: 60 blocks of 64
    W = layer.weight.detach().clone()
    quantize.quantize_(layer, quantize.QuantizeConfig(double_quant=double_quant))
    blocks = W.reshape(-1, 64)
    absmax = blocks.abs().amax(dim=1, keepdim=True)
    used = dequantized_absmax(layer).unsqueeze(1) if double_quant else absmax
    error = (layer.weight.detach().reshape(-1, 64) - blocks).abs()
    half_gap = (NF4_CODE.diff().max() / 2).item()
    assert (error <= half_gap * absmax + (absmax - used).abs() + 1e-6).all()
    # and the values are the standard codebook times each block's scale
    ratios = layer.weight.detach().reshape(-1, 64) / used
    assert ((ratios.unsqueeze(-1) - NF4_CODE).abs().amin(dim=-1) < 1e-5).all()
    relative = (layer.weight.detach() - W).norm() / W.norm()
    assert 0.05 < relative < 0.11  # NF4 on a uniform-init weight: about 9 % (wrong block size or code: much more)


def test_qlora_at_step_zero_equals_the_quantized_base_and_not_the_full_precision_one():
    loaded = tiny("tiny-llama")
    names = find_targets(loaded.module, "all-linear", loaded.head)
    reference = copy.deepcopy(loaded.module)
    full_precision = copy.deepcopy(loaded.module)
    for name in names:
        quantize.quantize_(reference.get_submodule(name))
    build_variant({"name": "qlora", "r": 4}).adapt(loaded.module, head=loaded.head)
    assert all(quantize.is_quantized(layer.base) for layer in adapter_layers(loaded.module))
    batch = batch_for(loaded)
    torch.testing.assert_close(logits(loaded.module, batch), logits(reference, batch), atol=1e-6, rtol=1e-6)
    assert not torch.allclose(logits(loaded.module, batch), logits(full_precision, batch), atol=1e-4)


def test_merging_dequantizes_says_so_and_computes_what_the_adapter_did(caplog, monkeypatch):
    monkeypatch.setattr(quantize, "_logged", set())  # the line is logged once per process
    loaded = tiny("tiny-bert")
    build_variant({"name": "qlora", "r": 4}).adapt(loaded.module, head=loaded.head)
    model = loaded.module.eval()
    perturb(model)
    batch = batch_for(loaded)
    expected = logits(model, batch)
    with caplog.at_level(logging.INFO, logger="lorafactory"):
        merge_adapters(model)
    assert "dequantized and kept in full precision" in caplog.text
    for layer in adapter_layers(model):
        assert not quantize.is_quantized(layer.base) and layer.base.weight.dtype == torch.float32
    torch.testing.assert_close(logits(model, batch), expected, atol=1e-5, rtol=1e-5)


def test_the_training_path_never_saves_a_dequantized_weight_for_the_backward():
    """QLoRA's point: what stays alive between forward and backward is activations and 4-bit codes, not W0."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(48, 40))
    build_variant({"name": "qlora", "r": 4, "targets": ["0"]}).adapt(model, head=())
    perturb(model)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        out = model(torch.randn(64, 48, requires_grad=True))
    assert torch.Size([40, 48]) not in saved
    out.square().sum().backward()
    assert model[0].lora_A.grad is not None and model[0].lora_B.grad.abs().sum() > 0


def test_qlora_matches_peft_lora_on_a_bitsandbytes_4bit_base():
    skip_where_bnb_misplaces_partial_rows()
    """Same NF4 codes (bitsandbytes quantizes both), same adapter weights: same outputs and gradients."""
    bnb = pytest.importorskip("bitsandbytes")
    peft = pytest.importorskip("peft")
    loaded = tiny("tiny-llama")
    theirs = copy.deepcopy(loaded.module)
    names = find_targets(loaded.module, "all-linear", loaded.head)
    for name in names:
        linear = theirs.get_submodule(name)
        q = bnb.nn.Linear4bit(
            linear.in_features,
            linear.out_features,
            bias=linear.bias is not None,
            compute_dtype=torch.float32,
            compress_statistics=True,
            quant_type="nf4",
        )
        q.weight = bnb.nn.Params4bit(
            linear.weight.data.clone(), requires_grad=False, compress_statistics=True, quant_type="nf4", blocksize=64
        )
        replace_module(theirs, name, q.to("cpu"))
    theirs.is_loaded_in_4bit = True  # what transformers sets on a 4-bit model: PEFT then uses its bnb LoRA layer
    variant = build_variant({"name": "qlora", "r": 4, "alpha": 8})
    variant.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    theirs = peft.get_peft_model(theirs, variant.peft_config(names, list(loaded.head)))
    inner = theirs.base_model.model
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name in names:
            mine, twin = loaded.module.get_submodule(name), inner.get_submodule(name)
            assert type(twin).__module__ == "peft.tuners.lora.bnb"
            mine.lora_A.add_(0.1 * torch.randn(mine.lora_A.shape, generator=g))
            mine.lora_B.copy_(0.1 * torch.randn(mine.lora_B.shape, generator=g))
            twin.lora_A["default"].weight.copy_(mine.lora_A)
            twin.lora_B["default"].weight.copy_(mine.lora_B)
    batch = batch_for(loaded, batch_size=4, seq=12)
    out, ref = loaded.module.train()(**batch), theirs.train()(**batch)
    torch.testing.assert_close(out.logits, ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    ref.loss.backward()
    for name in names:
        mine, twin = loaded.module.get_submodule(name), inner.get_submodule(name)
        torch.testing.assert_close(mine.lora_A.grad, twin.lora_A["default"].weight.grad, atol=1e-5, rtol=1e-4)
        torch.testing.assert_close(mine.lora_B.grad, twin.lora_B["default"].weight.grad, atol=1e-5, rtol=1e-4)


# --- model.quantize -------------------------------------------------------------------------------------------------


def quantized_names(model):
    return {n for n, m in model.named_modules() if quantize.is_quantized(m)}


def test_model_quantize_stores_the_targets_or_every_linear_layer_but_never_the_head():
    root = OmegaConf.create({"model": tiny_cfg("tiny-bert"), "variant": {"targets": "attn"}})
    root.model.quantize = "nf4"
    targets = quantized_names(build_model(root.model, 2).module)
    assert targets and all(n.endswith(("query", "value")) for n in targets)

    cfg = tiny_cfg("tiny-bert")
    cfg.quantize = {"format": "nf4", "layers": "all-linear"}
    loaded = build_model(cfg, 2)
    linears = {n for n, m in loaded.module.named_modules() if isinstance(m, torch.nn.Linear)}
    assert quantized_names(loaded.module) == linears - {"classifier"}

    cfg.quantize = "nf4"  # layers: targets, with no composed config to read variant.targets from
    with pytest.raises(ConfigError, match="no variant.targets is known here"):
        build_model(cfg, 2)
    cfg.quantize = "int3"
    with pytest.raises(ConfigError, match="model.quantize.format must be one of nf4, got 'int3'"):
        build_model(cfg, 2)
    cfg.quantize = {"layers": ["query", "valeu"]}
    with pytest.raises(ConfigError, match=r"^model.quantize.layers: 'valeu' \(in \['query', 'valeu'\]\) matched no"):
        build_model(cfg, 2)


def test_model_quantize_leaves_kxk_convolutions_in_full_precision(caplog):
    cfg = tiny_cfg("tiny-cnn")
    cfg.quantize = {"layers": "all-conv"}
    with caplog.at_level(logging.WARNING, logger="lorafactory"):
        model = build_model(cfg, 3).module
    assert quantized_names(model) == {"expand", "project", "head_conv"}
    assert "stay in full precision (stem" in caplog.text


# The variants that quantize their targets themselves or initialise from the gradient of W0 (they need W0), and full
# fine-tuning (codes cannot train).
REFUSE = {"full", "loftq", "lq_lora", "qwha", "lora_ga", "lora_sb"}


def test_the_variants_that_cannot_use_a_quantized_base_say_why():
    for name in REFUSE:
        assert VARIANTS.get(name).quantized_base
    for name in ("lora", "qlora", "dora", "pissa", "head_only"):
        assert VARIANTS.get(name).quantized_base is None


@pytest.mark.parametrize("variant", VARIANTS.names())
def test_every_variant_runs_on_a_quantized_base_or_refuses_in_one_line(variant):
    """On a model whose linear layers are stored in NF4: the variant trains (gradients reach everything it trains)
    and, when mergeable, merging computes what the adapter did; or it refuses with one line that says why."""
    cfg = tiny_cfg("tiny-bert")
    cfg.quantize = {"layers": "all-linear"}
    loaded = build_model(cfg, 3)
    v = build_variant(
        {"name": variant, "r": 4, "targets": "all-linear", **contract_config(variant, "tiny-bert", "all-linear", 4)}
    )
    if v.quantized_base:
        with pytest.raises(ConfigError, match=f"^variant={variant} cannot run on a base stored quantized") as err:
            v.adapt(loaded.module, head=loaded.head)
        assert "\n" not in str(err.value) and str(err.value).endswith("drop model.quantize")
        return
    v.adapt(loaded.module, head=loaded.head)
    unfreeze(loaded.module, loaded.head)
    model = loaded.module.train()
    batch = batch_for(loaded, batch_size=4)
    v.init_from_data(model, iter([batch] * 100), lambda m, b: m(**b).loss)
    perturb(model)
    aux = v.aux_loss(model)  # as the training loop adds it: gates (Bayesian-LoRA's) may learn from it alone at first
    (model(**batch).loss + (0 if aux is None else aux)).backward()
    trained = [p for p in model.parameters() if p.requires_grad]  # the adapter's and the head's
    assert trained and all(p.grad is not None and p.grad.abs().sum() > 0 for p in trained)
    if v.mergeable:
        model.eval()
        expected = logits(model, batch)
        merge_adapters(model)
        torch.testing.assert_close(logits(model, batch), expected, atol=1e-4, rtol=1e-4)


CONFIG_MISTAKES = [
    (["model.quantize=int3"], "model.quantize.format must be one of nf4, got 'int3'"),
    (["model.quantize={block_size:48}"], "model.quantize.block_size must be a power of two in [32, 4096], got 48"),
    (["model.quantize={bits:4}"], "model.quantize has no option bits; it takes format, layers, block_size"),
    (["model.quantize={layers:mlp}"], "model.quantize.layers must be targets, one of"),
    (["model.quantize={double_quant:1}"], "model.quantize.double_quant must be true or false, got 1"),
    (["model.quantize=[nf4]"], "model.quantize must be null, a format (nf4) or a mapping, got ['nf4']"),
    (["variant=loftq", "model.quantize=nf4"], "variant=loftq cannot run on a base stored quantized (model.quantize)"),
    (["variant=full", "model.quantize=nf4"], "variant=full cannot run on a base stored quantized (model.quantize)"),
]


@pytest.mark.parametrize(("args", "expected"), CONFIG_MISTAKES, ids=[" ".join(a) for a, _ in CONFIG_MISTAKES])
def test_model_quantize_mistakes_are_one_line_before_anything_is_built(args, expected):
    from lorafactory.config import check_overrides

    with pytest.raises(UserError) as caught:
        check_overrides(["model=tiny-bert", *args])
    assert expected in str(caught.value) and "\n" not in str(caught.value)


def test_a_valid_model_quantize_passes_the_checks():
    from lorafactory.config import check_overrides

    check_overrides(["model=tiny-bert", "variant=qlora", "model.quantize=nf4"])
    check_overrides(["model=tiny-bert", "model.quantize={layers:[query,value],double_quant:false}"])


def test_a_quantized_model_counts_the_values_of_its_weights_not_its_packed_codes():
    cfg = tiny_cfg("tiny-bert")
    plain = build_model(cfg, 2).module
    cfg.quantize = {"layers": "all-linear"}
    quantized = build_model(cfg, 2).module
    assert quantize.parameter_count(quantized) == sum(p.numel() for p in plain.parameters())
    assert sum(p.numel() for p in quantized.parameters()) < quantize.parameter_count(quantized)
