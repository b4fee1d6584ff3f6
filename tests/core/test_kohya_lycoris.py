"""LyCORIS LoHa / LoKr in kohya files: exact float64 round trips on the real glyph UNet (Linear and 3x3 Conv2d,
plain and Tucker forms), hand-made LyCORIS files read with LyCORIS's formulas (written out here, independently
of deltatune's methods), and refusals of what deltatune's LoHa / LoKr cannot reproduce."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import deltatune as dt
from core.glyph_unet import run
from deltatune.core.formats import detect_format
from deltatune.core.kohya_format import save_kohya_adapter
from deltatune.errors import AdapterFileError, DeltatuneError

pytest.importorskip("diffusers")
TARGETS = ["to_q", "to_v", "conv1", "time_emb_proj"]  # Linear and 3x3 Conv2d layers
Q, CONV = "down_blocks.1.attentions.0.to_q", "down_blocks.0.resnets.0.conv1"




def adapted(unet, config):
    torch.manual_seed(0)
    return dt.adapt(copy.deepcopy(unet), config)


def tensors_of(model):
    return {k: v.detach().clone() for k, v in dt.core.attach.adapter_state_dict(model).items()}


CONFIGS = {
    "loha": dt.LoHaConfig(rank=4, alpha=6.0, init="random", targets=TARGETS),
    "loha tucker": dt.LoHaConfig(rank=2, alpha=3.0, init="random", effective_conv2d=True, targets=TARGETS),
    "lokr full": dt.LoKrConfig(init="random", targets=TARGETS),  # rank 8: every factor full, scale 1
    "lokr low rank": dt.LoKrConfig(rank=2, alpha=3.0, init="random", decompose_both=True, targets=TARGETS),
    "lokr tucker": dt.LoKrConfig(rank=2, alpha=5.0, init="random", effective_conv2d=True, targets=TARGETS),
    "lokr factor 4": dt.LoKrConfig(rank=1, alpha=2.0, init="random", decompose_factor=4, targets=TARGETS),
}


@pytest.mark.parametrize("case", CONFIGS)
def test_round_trip_is_exact_on_the_glyph_unet(unet, inputs, tmp_path, case):
    model = adapted(unet, CONFIGS[case])
    path = save_kohya_adapter(model, tmp_path / "lyco.safetensors")
    assert detect_format(path)[0].name == "kohya"
    loaded = dt.load_adapter(copy.deepcopy(unet), path)
    ours, again = tensors_of(model), tensors_of(loaded)
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    own = dt.load_adapter(copy.deepcopy(unet), dt.save_adapter(model, tmp_path / "own"))
    assert torch.equal(run(loaded, inputs), run(own, inputs))
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), rtol=1e-12, atol=1e-12)
    assert (run(model, inputs) - run(unet, inputs)).abs().max() > 1e-4


def test_keys_and_metadata_are_lycoris(unet, tmp_path):
    path = save_kohya_adapter(adapted(unet, CONFIGS["lokr low rank"]), tmp_path / "k.safetensors")
    with safe_open(str(path), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
        alpha = handle.get_tensor(f"lora_unet_{Q.replace('.', '_')}.alpha")
    name = f"lora_unet_{Q.replace('.', '_')}"
    assert {f"{name}.{s}" for s in ("lokr_w1_a", "lokr_w1_b", "lokr_w2_a", "lokr_w2_b", "alpha")} <= keys
    assert float(alpha) == 3.0
    assert metadata["ss_network_module"] == "lycoris.kohya" and json.loads(metadata["ss_network_args"]) == \
        {"algo": "lokr"}


def lycoris_file(path, modules):
    save_file({f"lora_unet_{p.replace('.', '_')}.{k}": v.clone() for p, group in modules.items()
               for k, v in group.items()}, str(path))


def delta_of(model, module_path):
    host = model.get_submodule(module_path)
    return host.deltas["default"].delta_weight(host.base_layer.weight)


def test_a_loha_file_means_what_lycoris_means(unet, tmp_path):
    """ΔW = (alpha / r) (w1_a w1_b) ⊙ (w2_a w2_b) in the (out, in·k·k) view, r = hada_w1_b's rows."""
    g = torch.Generator().manual_seed(3)
    modules = {}
    for module_path in (Q, CONV):
        weight = unet.get_submodule(module_path).weight
        out, fan_in = weight.shape[0], weight[0].numel()
        modules[module_path] = {"hada_w1_a": torch.randn(out, 3, generator=g, dtype=torch.float64),
                                "hada_w1_b": torch.randn(3, fan_in, generator=g, dtype=torch.float64),
                                "hada_w2_a": torch.randn(out, 3, generator=g, dtype=torch.float64),
                                "hada_w2_b": torch.randn(3, fan_in, generator=g, dtype=torch.float64),
                                "alpha": torch.tensor(1.5, dtype=torch.float16)}
    lycoris_file(tmp_path / "h.safetensors", modules)
    model = dt.load_adapter(copy.deepcopy(unet), tmp_path / "h.safetensors")
    for module_path, m in modules.items():
        shape = unet.get_submodule(module_path).weight.shape
        expected = 0.5 * (m["hada_w1_a"] @ m["hada_w1_b"]) * (m["hada_w2_a"] @ m["hada_w2_b"])
        torch.testing.assert_close(delta_of(model, module_path), expected.reshape(shape), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("stored_alpha, scale", [(2.0, 1.0), (16.0, 1.0)])
def test_a_lokr_file_with_full_factors_runs_at_scale_one(unet, tmp_path, stored_alpha, scale):
    """LyCORIS: both factors full -> no alpha scaling (whatever alpha the file stores)."""
    g = torch.Generator().manual_seed(4)
    w1, w2 = torch.randn(8, 8, generator=g, dtype=torch.float64), torch.randn(8, 8, generator=g, dtype=torch.float64)
    lycoris_file(tmp_path / "k.safetensors", {Q: {"lokr_w1": w1, "lokr_w2": w2, "alpha": torch.tensor(stored_alpha)}})
    model = dt.load_adapter(copy.deepcopy(unet), tmp_path / "k.safetensors")
    torch.testing.assert_close(delta_of(model, Q), scale * torch.kron(w1, w2), rtol=1e-12, atol=1e-12)


def test_a_low_rank_lokr_file_scales_by_alpha_over_rank(unet, tmp_path):
    g = torch.Generator().manual_seed(5)
    group = {"lokr_w1": torch.randn(8, 8, generator=g, dtype=torch.float64),
             "lokr_w2_a": torch.randn(8, 2, generator=g, dtype=torch.float64),
             "lokr_w2_b": torch.randn(2, 8, generator=g, dtype=torch.float64), "alpha": torch.tensor(3.0)}
    lycoris_file(tmp_path / "k.safetensors", {Q: group, "down_blocks.1.attentions.0.to_k": group})
    model = dt.load_adapter(copy.deepcopy(unet), tmp_path / "k.safetensors")
    expected = 1.5 * torch.kron(group["lokr_w1"], group["lokr_w2_a"] @ group["lokr_w2_b"])
    torch.testing.assert_close(delta_of(model, Q), expected, rtol=1e-12, atol=1e-12)


# --- refusals -----------------------------------------------------------------------------------------------------
def test_mixed_methods_and_unreproducible_splits_are_refused(unet, tmp_path):
    g = torch.Generator().manual_seed(6)
    mixed = {Q: {"hada_w1_a": torch.zeros(64, 2), "hada_w1_b": torch.zeros(2, 64), "hada_w2_a": torch.zeros(64, 2),
                 "hada_w2_b": torch.zeros(2, 64)},
             CONV: {"lora_down.weight": torch.zeros(2, 32, 3, 3), "lora_up.weight": torch.zeros(32, 2, 1, 1)}}
    lycoris_file(tmp_path / "m.safetensors", mixed)
    with pytest.raises(AdapterFileError, match="mixes LOHA and LORA modules"):
        dt.load_adapter(copy.deepcopy(unet), tmp_path / "m.safetensors")
    odd = {Q: {"lokr_w1": torch.randn(2, 32, generator=g), "lokr_w2": torch.randn(32, 2, generator=g)}}
    lycoris_file(tmp_path / "o.safetensors", odd)
    with pytest.raises(AdapterFileError, match="no decompose_factor splits every module"):
        dt.load_adapter(copy.deepcopy(unet), tmp_path / "o.safetensors")


def test_full_and_low_rank_lokr_modules_at_another_scale_are_refused(unet, tmp_path):
    # rank 4: to_q (64 = 8·8) keeps full factors, time_emb_proj (in 128 = 8·16) a low-rank second factor
    config = dt.LoKrConfig(rank=4, alpha=2.0, init="random", targets=["to_q", "time_emb_proj"])
    model = adapted(unet, config)
    with pytest.raises(DeltatuneError, match="LyCORIS files run at scale 1"):
        save_kohya_adapter(model, tmp_path / "k.safetensors")
    assert not (tmp_path / "k.safetensors").exists()
    same_scale = adapted(unet, dt.LoKrConfig(rank=4, alpha=4.0, init="random", targets=["to_q", "time_emb_proj"]))
    loaded = dt.load_adapter(copy.deepcopy(unet), save_kohya_adapter(same_scale, tmp_path / "k.safetensors"))
    assert torch.equal(tensors_of(loaded)[f"{Q}.lokr_w1"], tensors_of(same_scale)[f"{Q}.lokr_w1"])
    g = torch.Generator().manual_seed(7)
    # time_emb_proj is (32, 128): W1 (4, 8), W2 (8, 16) = (8, 2)(2, 16)
    group = {"lokr_w1": torch.randn(4, 8, generator=g), "lokr_w2_a": torch.randn(8, 2, generator=g),
             "lokr_w2_b": torch.randn(2, 16, generator=g), "alpha": torch.tensor(1.0)}
    lycoris_file(tmp_path / "mixed.safetensors", {"down_blocks.0.resnets.0.time_emb_proj": group,
                                                  Q: {"lokr_w1": torch.randn(8, 8), "lokr_w2": torch.randn(8, 8)}})
    with pytest.raises(AdapterFileError, match="runs at scale 1, beside low-rank modules"):
        dt.load_adapter(copy.deepcopy(unet), tmp_path / "mixed.safetensors")


def test_loha_ranks_that_differ_are_refused(unet, tmp_path):
    modules = {p: {"hada_w1_a": torch.zeros(64, r), "hada_w1_b": torch.zeros(r, 64), "hada_w2_a": torch.zeros(64, r),
                   "hada_w2_b": torch.zeros(r, 64)} for p, r in ((Q, 2), ("down_blocks.1.attentions.0.to_k", 3))}
    lycoris_file(tmp_path / "h.safetensors", modules)
    with pytest.raises(AdapterFileError, match="the rank differs between modules"):
        dt.load_adapter(copy.deepcopy(unet), tmp_path / "h.safetensors")
