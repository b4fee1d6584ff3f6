"""diffusers LoRA files: exact round trips on the real glyph UNet (float64), an adapter written by deltatune
loaded by diffusers' own loader (`PeftAdapterMixin.load_lora_adapter`) with the same outputs, files written by
diffusers' own savers loaded by deltatune, precise detection and refusals by name."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import deltatune as dt
from core.glyph_unet import run
from deltatune.core.diffusers_format import WEIGHTS, load_diffusers_adapter
from deltatune.core.formats import detect_format
from deltatune.errors import AdapterFileError, DeltatuneError

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")
from diffusers.loaders.lora_pipeline import StableDiffusionLoraLoaderMixin  # noqa: E402
from diffusers.loaders.peft import PeftAdapterMixin  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2", "time_emb_proj"]


class PeftUNet2DModel(diffusers.UNet2DModel, PeftAdapterMixin):
    """UNet2DModel with diffusers' LoRA loader (diffusers gives it to its conditional UNets and transformers)."""




def adapted(unet, config_cls=dt.LoRAConfig, **fields):
    torch.manual_seed(0)
    fields = {"rank": 4, "alpha": 6.0, "targets": TARGETS, **fields}
    model = dt.adapt(copy.deepcopy(unet), config_cls(**fields))
    with torch.no_grad():  # B starts at zero: make the update non-zero everywhere
        for _, _, delta in dt.core.model.iter_deltas(model):
            for parameter in delta.parameters():
                parameter.normal_(0, 0.05)
    return model


def diffusers_unet(unet):
    model = PeftUNet2DModel.from_config(unet.config)
    model.load_state_dict(unet.state_dict())
    return model.double().eval()


def test_round_trip_is_exact(unet, inputs, tmp_path):
    model = adapted(unet)
    folder = dt.save_adapter(model, tmp_path / "lora", format="diffusers")
    assert sorted(p.name for p in folder.iterdir()) == [WEIGHTS]
    assert detect_format(folder)[0].name == detect_format(folder / WEIGHTS)[0].name == "diffusers"
    loaded = dt.load_adapter(copy.deepcopy(unet), folder)
    own = dt.load_adapter(copy.deepcopy(unet), dt.save_adapter(model, tmp_path / "own"))
    ours = dt.core.attach.adapter_state_dict(model)
    again = dt.core.attach.adapter_state_dict(loaded)
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    assert torch.equal(run(loaded, inputs), run(own, inputs))
    torch.testing.assert_close(run(loaded, inputs), run(model, inputs), rtol=1e-12, atol=1e-12)


def test_keys_and_metadata_are_diffusers(unet, tmp_path):
    folder = dt.save_adapter(adapted(unet), tmp_path / "lora", format="diffusers")
    with safe_open(str(folder / WEIGHTS), framework="pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert "unet.down_blocks.1.attentions.0.to_q.lora_A.weight" in keys
    assert all(k.startswith("unet.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    packed = json.loads(metadata["lora_adapter_metadata"])
    assert packed["unet.r"] == 4 and packed["unet.lora_alpha"] == 6.0


@pytest.mark.parametrize("fields", [{}, {"rslora": True}, {"alpha": 1.5, "rank": 2}, {"bias": True}])
def test_diffusers_own_loader_gives_the_same_outputs(unet, inputs, tmp_path, fields):
    """The must-show check: a LoRA written by deltatune, loaded by diffusers' load_lora_adapter."""
    model = adapted(unet, **fields)
    folder = dt.save_adapter(model, tmp_path / "lora", format="diffusers")
    theirs = diffusers_unet(unet)
    theirs.load_lora_adapter(str(folder), prefix="unet", weight_name=WEIGHTS, adapter_name="glyph")
    assert sum(".lora_A." in k for k in theirs.state_dict()) == len(list(dt.core.model.iter_deltas(model)))
    torch.testing.assert_close(run(theirs, inputs), run(model, inputs), rtol=1e-10, atol=1e-10)
    assert (run(model, inputs) - run(unet, inputs)).abs().max() > 1e-3


def test_dora_loads_in_diffusers_with_the_same_outputs(unet, inputs, tmp_path):
    model = adapted(unet, dt.DoRAConfig, targets=["to_q", "to_v", "time_emb_proj"])
    folder = dt.save_adapter(model, tmp_path / "dora", format="diffusers")
    theirs = diffusers_unet(unet)
    theirs.load_lora_adapter(str(folder), prefix="unet", weight_name=WEIGHTS)
    torch.testing.assert_close(run(theirs, inputs), run(model, inputs), rtol=1e-10, atol=1e-10)
    back = dt.load_adapter(copy.deepcopy(unet), folder)
    torch.testing.assert_close(run(back, inputs), run(model, inputs), rtol=1e-12, atol=1e-12)


def test_files_diffusers_writes_load_with_the_same_outputs(unet, inputs, tmp_path):
    theirs = diffusers_unet(unet)
    peft = pytest.importorskip("peft")
    config = peft.LoraConfig(r=4, lora_alpha=3, target_modules=["to_q", "to_v", "conv1"], init_lora_weights=False)
    theirs.add_adapter(config, adapter_name="x")
    theirs.save_lora_adapter(str(tmp_path / "model_level"), adapter_name="x")  # keys without a component
    layers = peft.get_peft_model_state_dict(theirs, adapter_name="x")
    StableDiffusionLoraLoaderMixin.save_lora_weights(str(tmp_path / "pipeline_level"), unet_lora_layers=layers,
                                                     unet_lora_adapter_metadata=config.to_dict())
    expected = run(theirs, inputs)
    for folder in ("model_level", "pipeline_level"):
        assert detect_format(tmp_path / folder)[0].name == "diffusers"
        ours = dt.load_adapter(copy.deepcopy(unet), tmp_path / folder)
        torch.testing.assert_close(run(ours, inputs), expected, rtol=1e-10, atol=1e-10)


def test_without_metadata_alpha_is_the_rank(unet, tmp_path):
    model = adapted(unet, targets=["to_q"])
    with safe_open(str(dt.save_adapter(model, tmp_path / "a", format="diffusers") / WEIGHTS), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(tensors, str(tmp_path / "bare.safetensors"))
    loaded = dt.load_adapter(copy.deepcopy(unet), tmp_path / "bare.safetensors")
    config = dt.core.model.adapter_state(loaded).configs["default"]
    delta = next(delta for _, _, delta in dt.core.model.iter_deltas(loaded))
    assert float(delta.scale) == 1.0 and config.alpha == config.rank == 4


# --- detection and refusals -------------------------------------------------------------------------------------
def test_detection_is_precise(unet, tmp_path):
    model = adapted(unet)
    folders = {name: dt.save_adapter(model, tmp_path / name, format=name) for name in ("deltatune", "peft",
                                                                                     "diffusers")}
    kohya = dt.save_adapter(model, tmp_path / "k.safetensors", format="kohya")
    for name, folder in folders.items():
        assert detect_format(folder)[0].name == name
    assert detect_format(kohya)[0].name == "kohya"
    (tmp_path / "peft" / WEIGHTS).write_bytes((folders["diffusers"] / WEIGHTS).read_bytes())
    with pytest.raises(AdapterFileError, match=r"several formats \(peft, diffusers\)"):
        detect_format(tmp_path / "peft")


def test_a_file_with_several_components_loads_one_by_prefix(unet, tmp_path):
    model = adapted(unet, targets=["to_q"])
    with safe_open(str(dt.save_adapter(model, tmp_path / "a", format="diffusers") / WEIGHTS), "pt") as handle:
        tensors = {k: handle.get_tensor(k) for k in handle.keys()}
    tensors["text_encoder.text_model.q.lora_A.weight"] = torch.zeros(4, 8)
    save_file(tensors, str(tmp_path / "both.safetensors"))
    with pytest.raises(AdapterFileError, match="adapts several components"):
        dt.load_adapter(copy.deepcopy(unet), tmp_path / "both.safetensors")
    loaded = load_diffusers_adapter(copy.deepcopy(unet), tmp_path / "both.safetensors", prefix="unet")
    assert dt.adapter_names(loaded) == ["default"]


def test_older_layouts_and_foreign_files_are_refused_by_name(unet, tmp_path):
    save_file({"unet.down_blocks.1.attentions.0.processor.to_q_lora.down.weight": torch.zeros(4, 64),
               "unet.down_blocks.1.attentions.0.to_k.lora_A.weight": torch.zeros(4, 64)},
              str(tmp_path / "old.safetensors"))
    with pytest.raises(AdapterFileError, match="is not a peft LoRA key"):
        dt.load_adapter(copy.deepcopy(unet), tmp_path / "old.safetensors")
    model = adapted(unet)
    folder = tmp_path / "shared"
    folder.mkdir()
    (folder / WEIGHTS).write_bytes(b"someone else's file")
    with pytest.raises(AdapterFileError, match="was not written by deltatune's diffusers save"):
        dt.save_adapter(model, folder, format="diffusers")
    assert (folder / WEIGHTS).read_bytes() == b"someone else's file"
    with pytest.raises(DeltatuneError, match="has no diffusers LoRA form"):
        dt.save_adapter(dt.adapt(copy.deepcopy(unet), dt.SSFConfig(targets=["to_q"])), tmp_path / "s",
                        format="diffusers")
    with pytest.raises(AdapterFileError, match="already holds a diffusers adapter"):
        dt.save_adapter(model, dt.save_adapter(model, tmp_path / "d", format="diffusers"))


@pytest.mark.parametrize("fields", [{}, {"rank": 2, "alpha": 3.0, "decompose_both": True}])
def test_a_lokr_loads_in_diffusers_with_the_same_outputs(unet, inputs, tmp_path, fields):
    model = adapted(unet, dt.LoKrConfig, **{"rank": 8, "alpha": 8.0, **fields})
    folder = dt.save_adapter(model, tmp_path / "lokr", format="diffusers")
    theirs = diffusers_unet(unet)
    theirs.load_lora_adapter(str(folder), prefix="unet", weight_name=WEIGHTS)
    torch.testing.assert_close(run(theirs, inputs), run(model, inputs), rtol=1e-10, atol=1e-10)
    back = dt.load_adapter(copy.deepcopy(unet), folder)
    ours, again = dt.core.attach.adapter_state_dict(model), dt.core.attach.adapter_state_dict(back)
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    assert (run(model, inputs) - run(unet, inputs)).abs().max() > 1e-4
    with safe_open(str(folder / WEIGHTS), "pt") as handle:
        bare = {k: handle.get_tensor(k) for k in handle.keys()}
    save_file(bare, str(tmp_path / "bare.safetensors"))
    with pytest.raises(AdapterFileError, match="LoKr tensors without lora_adapter_metadata"):
        dt.load_adapter(copy.deepcopy(unet), tmp_path / "bare.safetensors")
