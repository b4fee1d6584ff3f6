"""Bottleneck adapters: sequential y + s·up(f(down(y))) and parallel base(x) + s·up(f(down(x))) against float64
hand-written references; identity at init; the Houlsby/Pfeiffer presets on the shipped BERT, ViT and Llama
backbones; composition with LoRA on one layer; merge refused with every layer untouched; bad configs by name."""
from __future__ import annotations

import copy
import functools
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import deltatune as dt
from deltatune.errors import ConfigError, NotMergeableError, UnsupportedLayerError
from deltatune.methods.bottleneck_adapter import PLACEMENTS, BottleneckAdapterConfig, ParallelAdapterConfig


def _block(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(10, 16), nn.Tanh(), nn.Linear(16, 12)).double()


def _x(*shape: int, seed: int = 1) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _randomize(model: nn.Module, seed: int = 2, scale: float = 0.3) -> None:
    """Every adapter tensor away from its init (a zero up-projection would hide down, f and the biases)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for parameter in delta.parameters():
                parameter.copy_(scale * torch.randn(parameter.shape, generator=generator, dtype=parameter.dtype))


def _by_hand(delta, h: torch.Tensor, activation) -> torch.Tensor:
    down, up = delta.adapter_down, delta.adapter_up
    inner = activation(h @ down.weight.T + down.bias)
    return delta.config.scaling * (inner @ up.weight.T + up.bias)


# --- the forward, against hand-written float64 references ------------------------------------------------------
@pytest.mark.parametrize("activation,function", [("relu", F.relu), ("swish", lambda v: v * torch.sigmoid(v)),
                                                 ("tanh", torch.tanh)])
def test_sequential_adds_the_bottleneck_of_the_layers_output(activation, function):
    model, reference = _block(), _block()
    dt.adapt(model, BottleneckAdapterConfig(targets=["2"], non_linearity=activation, scaling=0.7))
    _randomize(model)
    x = _x(4, 10)
    y = reference(x)
    delta = model[2].deltas["default"]
    torch.testing.assert_close(model(x), y + _by_hand(delta, y, function), rtol=1e-12, atol=1e-12)
    assert delta.adapter_down.weight.shape == (12 // 16 or 1, 12)  # r = max(1, 12 // 16)


def test_parallel_adds_the_bottleneck_of_the_layers_input():
    model, reference = _block(), _block()
    dt.adapt(model, ParallelAdapterConfig(targets=["2"]))
    _randomize(model)
    x = _x(3, 5, 10)
    hidden = torch.tanh(reference[0](x))
    delta = model[2].deltas["default"]
    assert delta.adapter_down.weight.shape == (6, 16) and delta.adapter_up.weight.shape == (12, 6)  # r = 12 // 2
    expected = reference[2](hidden) + _by_hand(delta, hidden, F.relu)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)
    assert delta.config.scaling == 4.0  # par_bn's


def test_sequential_after_a_conv_mixes_channels_at_every_position():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1)).double()
    reference = copy.deepcopy(model)
    dt.adapt(model, BottleneckAdapterConfig(targets=["0"], bottleneck_size=3))
    _randomize(model)
    x = _x(2, 3, 5, 5)
    y = reference(x)
    delta = model[0].deltas["default"]
    expected = y + _by_hand(delta, y.movedim(1, -1), F.relu).movedim(-1, 1)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


# --- initialization -----------------------------------------------------------------------------------------
def test_zero_up_init_is_the_identity_and_the_library_default_is_near_it():
    x = _x(4, 10)
    expected = _block()(x)
    exact = dt.adapt(_block(), BottleneckAdapterConfig(targets=["0", "2"], init="mam_adapter"))
    torch.testing.assert_close(exact(x), expected, rtol=0, atol=0)
    parallel = dt.adapt(_block(), ParallelAdapterConfig(targets=["0", "2"]))
    torch.testing.assert_close(parallel(x), expected, rtol=0, atol=0)
    torch.manual_seed(3)
    near = dt.adapt(_block(), BottleneckAdapterConfig(targets=["0", "2"], bottleneck_size=4))  # "bert": N(0, 0.02²)
    gap = (near(x) - expected).abs().max().item()
    assert 0 < gap < 0.05 * expected.abs().max().item(), gap
    delta = near[2].deltas["default"]
    assert abs(delta.adapter_up.weight.std().item() - 0.02) < 0.01 and not delta.adapter_up.bias.any()


def test_houlsby_init_is_truncated_at_two_hundredths():
    torch.manual_seed(0)
    model = dt.adapt(nn.Sequential(nn.Linear(400, 400)), BottleneckAdapterConfig(targets=["0"], init="houlsby"))
    weights = model[0].deltas["default"].adapter_down.weight
    assert weights.abs().max().item() <= 0.02 and 0.005 < weights.std().item() < 0.01


# --- presets: placement by module names ---------------------------------------------------------------------
@functools.cache
def _backbone_paths(name: str) -> tuple[str, ...]:
    from deltatune.data.models import load_minilm_backbone
    from deltatune.data.vision import load_glyph_vit
    from deltatune.data.wordnet_lm import load_wordnet_lm_model

    loader = {"minilm": load_minilm_backbone, "vit": load_glyph_vit, "llama": load_wordnet_lm_model}[name]
    model = dt.adapt(loader(), BottleneckAdapterConfig(targets="houlsby"), name="houlsby")
    dt.adapt(model, BottleneckAdapterConfig(targets="pfeiffer"), name="pfeiffer")
    return tuple(f"{adapter}:{path}" for path, adapter, _ in dt.iter_deltas(model))


PRESET_LAYERS = {  # (attention output, FFN output) of each block
    "minilm": (r"encoder\.layer\.(\d+)\.attention\.output\.dense", r"encoder\.layer\.(\d+)\.output\.dense"),
    "vit": (r"backbone\.layers\.(\d+)\.attention\.o_proj", r"backbone\.layers\.(\d+)\.mlp\.fc2"),
    "llama": (r"model\.layers\.(\d+)\.self_attn\.o_proj", r"model\.layers\.(\d+)\.mlp\.down_proj"),
}


@pytest.mark.parametrize("backbone", sorted(PRESET_LAYERS))
def test_houlsby_adapts_both_outputs_of_every_block_and_pfeiffer_only_the_ffn(backbone):
    paths = _backbone_paths(backbone)
    attention, ffn = (re.compile(pattern) for pattern in PRESET_LAYERS[backbone])
    houlsby = [p.split(":", 1)[1] for p in paths if p.startswith("houlsby:")]
    pfeiffer = [p.split(":", 1)[1] for p in paths if p.startswith("pfeiffer:")]
    blocks = {ffn.fullmatch(p).group(1) for p in pfeiffer}
    assert len(blocks) >= 2 and len(pfeiffer) == len(blocks), pfeiffer
    assert all(ffn.fullmatch(p) for p in pfeiffer), pfeiffer
    assert len(houlsby) == 2 * len(blocks), houlsby
    assert {attention.fullmatch(p).group(1) for p in houlsby if attention.fullmatch(p)} == blocks
    assert set(pfeiffer) < set(houlsby)


def test_the_presets_set_the_librarys_activations_and_resolve_into_a_saved_expression():
    houlsby, pfeiffer = BottleneckAdapterConfig(targets="houlsby"), BottleneckAdapterConfig()
    assert (houlsby.non_linearity, pfeiffer.non_linearity) == ("swish", "relu")
    assert houlsby.targets == PLACEMENTS["houlsby"] and pfeiffer.targets == PLACEMENTS["pfeiffer"]
    assert BottleneckAdapterConfig.from_dict(houlsby.to_dict()) == houlsby
    cli = BottleneckAdapterConfig(targets=BottleneckAdapterConfig.parse_field("targets", "houlsby"))
    assert cli == houlsby
    assert BottleneckAdapterConfig(targets="houlsby", non_linearity="gelu").non_linearity == "gelu"


# --- composition with a weight delta on the same layer ------------------------------------------------------
def test_on_one_layer_lora_adds_first_and_the_sequential_adapter_transforms_the_sum():
    model, reference = _block(), _block()
    dt.adapt(model, dt.LoRAConfig(targets=["2"], rank=2), name="lora")
    dt.adapt(model, BottleneckAdapterConfig(targets=["2"], bottleneck_size=3), name="adapter")
    _randomize(model)
    x = _x(4, 10)
    hidden = torch.tanh(reference[0](x))
    lora, adapter = model[2].deltas["lora"], model[2].deltas["adapter"]
    summed = reference[2](hidden) + lora(hidden)
    expected = summed + _by_hand(adapter, summed, F.relu)
    for order in (["lora", "adapter"], ["adapter", "lora"]):  # weight → additive → output, whatever the order
        dt.set_active(model, order)
        torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_a_parallel_adapter_and_lora_add_side_by_side():
    model, reference = _block(), _block()
    dt.adapt(model, dt.LoRAConfig(targets=["2"], rank=2), name="lora")
    dt.adapt(model, ParallelAdapterConfig(targets=["2"]), name="parallel")
    _randomize(model)
    dt.set_active(model, ["lora", "parallel"])
    x = _x(4, 10)
    hidden = torch.tanh(reference[0](x))
    lora, parallel = model[2].deltas["lora"], model[2].deltas["parallel"]
    expected = reference[2](hidden) + lora(hidden) + _by_hand(parallel, hidden, F.relu)
    torch.testing.assert_close(model(x), expected, rtol=1e-12, atol=1e-12)


def test_the_whole_order_on_one_layer_weight_then_additive_then_outputs_in_active_order():
    """ID³ (weight space) → parallel adapter (additive) → SSF and the sequential adapter (outputs, in the order of
    the active set): the composition order of core.delta, with real methods of every kind."""
    model, reference = _block(), _block()
    dt.adapt(model, dt.config_for("id3", targets=["2"]), name="weight")
    dt.adapt(model, ParallelAdapterConfig(targets=["2"]), name="parallel")
    dt.adapt(model, dt.SSFConfig(targets=["2"]), name="ssf")
    dt.adapt(model, BottleneckAdapterConfig(targets=["2"], bottleneck_size=3), name="adapter")
    _randomize(model)
    host, x = model[2], _x(4, 10)
    hidden = torch.tanh(reference[0](x))
    weight = host.deltas["weight"].adapted_weight(reference[2].weight)
    summed = F.linear(hidden, weight, reference[2].bias) + _by_hand(host.deltas["parallel"], hidden, F.relu)
    ssf = host.deltas["ssf"]

    def scaled(h):
        return h * ssf.ssf_scale + ssf.ssf_shift

    def adapted(h):
        return h + _by_hand(host.deltas["adapter"], h, F.relu)

    dt.set_active(model, ["adapter", "weight", "ssf", "parallel"])
    torch.testing.assert_close(model(x), scaled(adapted(summed)), rtol=1e-12, atol=1e-12)
    dt.set_active(model, ["ssf", "parallel", "adapter", "weight"])
    torch.testing.assert_close(model(x), adapted(scaled(summed)), rtol=1e-12, atol=1e-12)


# --- merging is refused, leaving every layer as it was ------------------------------------------------------
@pytest.mark.parametrize("config", [BottleneckAdapterConfig(targets=["2"]), ParallelAdapterConfig(targets=["2"])])
def test_merge_is_refused_clearly_and_changes_no_layer(config):
    model = _block()
    dt.adapt(model, dt.LoRAConfig(targets=["0", "2"], rank=2), name="lora")
    dt.adapt(model, config, name="adapter")
    _randomize(model)
    dt.set_active(model, ["lora", "adapter"])
    x = _x(4, 10)
    expected = model(x).detach()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(NotMergeableError, match=r"on 2 is non-linear \(relu between its projections\)"):
        dt.merge(model)
    with pytest.raises(NotMergeableError):
        dt.unload(model, merge=True)
    assert all(torch.equal(value, before[key]) for key, value in model.state_dict().items())
    assert all(host.merged == () for _, host in dt.core.model.iter_hosts(model))
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)
    plain = dt.unload(model, merge=False)
    torch.testing.assert_close(plain(x), _block()(x), rtol=0, atol=0)


def test_save_then_load_is_exact_with_the_preset_on_a_bert_block(tmp_path):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=32, max_position_embeddings=16)
    base = BertModel(config).double().eval()
    fresh = copy.deepcopy(base)
    model = dt.adapt(base, BottleneckAdapterConfig(targets="houlsby", reduction_factor=4))
    _randomize(model)
    ids = torch.randint(0, 30, (2, 7), generator=torch.Generator().manual_seed(0))
    expected = model(input_ids=ids).last_hidden_state
    dt.save_adapter(model, tmp_path / "houlsby")
    loaded = dt.load_adapter(fresh, tmp_path / "houlsby")
    torch.testing.assert_close(loaded(input_ids=ids).last_hidden_state, expected, rtol=0, atol=0)
    saved = sum(tensor.numel() for tensor in dt.adapter_state_dict(loaded).values())
    assert saved == 4 * (2 * 16 * 4 + 4 + 16)  # 2 blocks × 2 adapters, r = 16 // 4


# --- bad configs and layers, refused by name ---------------------------------------------------------------
@pytest.mark.parametrize("field,value", [("reduction_factor", 0), ("bottleneck_size", 0), ("init", "xavier"),
                                         ("non_linearity", "sigmoidal"), ("dropout", 1.0), ("scaling", float("inf"))])
def test_bad_hyper_parameters_are_refused_by_name(field, value):
    for config_cls in (BottleneckAdapterConfig, ParallelAdapterConfig):
        with pytest.raises(ConfigError, match=field):
            config_cls(**{field: value})


def test_a_parallel_adapter_refuses_a_conv_and_a_preset_that_matches_nothing_says_so():
    with pytest.raises(UnsupportedLayerError, match="parallel_adapter cannot adapt '0'"):
        dt.adapt(nn.Sequential(nn.Conv2d(3, 4, 3)), ParallelAdapterConfig(targets=["0"]))
    with pytest.raises(dt.DeltatuneError, match="matched no adaptable module"):
        dt.adapt(_block(), BottleneckAdapterConfig())
