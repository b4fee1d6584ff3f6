"""Every bad input named in the foundation issue gets one clear error, and the model or files stay intact."""
from __future__ import annotations

import copy
import os
import pickle

import pytest
import torch
from torch import nn

import deltatune as dt
from contract.toy_models import build
from deltatune.core.host import AdaptedLayer
from deltatune.errors import AdapterFileError, AdapterNameError, ConfigError, TargetError


def _model():
    return build("linear")[0]


@pytest.mark.parametrize(
    "field,value,match",
    [("rank", 0, "rank=0"), ("rank", -3, "rank=-3"), ("alpha", 0, "alpha=0"), ("alpha", -1.0, "alpha=-1.0"),
     ("dropout", 1.0, "dropout=1.0"), ("dropout", -0.1, "dropout=-0.1"), ("init", "xavier", "init='xavier'")],
)
def test_invalid_hyperparameters_name_the_field_and_range(field, value, match):
    with pytest.raises(ConfigError, match=match):
        dt.LoRAConfig(**{field: value})


def test_rank_at_least_min_dimension_is_refused_and_model_untouched():
    model = _model()  # first: 20 -> 24, second: 24 -> 18
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ConfigError, match=r"rank=18 .*min\(in, out\) = 18 for second"):
        dt.adapt(model, dt.LoRAConfig(rank=18))
    assert not any(isinstance(m, AdaptedLayer) for m in model.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_targets_matching_nothing_list_near_misses():
    with pytest.raises(TargetError, match="near misses: first"):
        dt.adapt(_model(), dt.LoRAConfig(targets=["frist"]))


def test_targets_far_from_every_name_list_adaptable_layers_not_containers():
    model = nn.Sequential()
    model.add_module("encoder", nn.Sequential())
    model.encoder.add_module("query", nn.Linear(4, 4))
    model.encoder.add_module("act", nn.ReLU())
    with pytest.raises(TargetError) as error:
        dt.adapt(model, dt.LoRAConfig(targets=["zzz"]))
    message = str(error.value)
    assert "include: query (e.g. 'encoder.query')" in message
    assert "encoder," not in message and "act" not in message


def test_unknown_method_suggests_close_names():
    with pytest.raises(ConfigError, match="unknown method 'lorra'.*Did you mean lora"):
        dt.config_for("lorra")


def test_adapter_name_clash_is_refused():
    model = dt.adapt(_model(), dt.LoRAConfig(rank=2))
    with pytest.raises(AdapterNameError, match="already exists"):
        dt.adapt(model, dt.LoRAConfig(rank=2))
    with pytest.raises(AdapterNameError, match="invalid"):
        dt.adapt(model, dt.LoRAConfig(rank=2), name="has space")


def test_loading_an_adapter_of_another_shape_names_the_first_mismatch(tmp_path):
    model = dt.adapt(_model(), dt.LoRAConfig(rank=4))
    dt.save_adapter(model, tmp_path / "a")
    other = nn.Sequential()
    other.add_module("first", nn.Linear(20, 30).double())
    other.add_module("second", nn.Linear(30, 18).double())
    expected = r"tensor 'first.lora_B' has shape \(24, 4\) but the model expects \(30, 4\)"
    with pytest.raises(AdapterFileError, match=expected):
        dt.load_adapter(other, tmp_path / "a")
    assert not any(isinstance(m, AdaptedLayer) for m in other.modules())


def _saved(tmp_path):
    model = dt.adapt(_model(), dt.LoRAConfig(rank=4))
    dt.save_adapter(model, tmp_path / "a")
    return tmp_path / "a"


def test_truncated_safetensors_is_reported(tmp_path):
    folder = _saved(tmp_path)
    weights = folder / "deltatune_adapter.safetensors"
    weights.write_bytes(weights.read_bytes()[:-40])
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        dt.load_adapter(_model(), folder)


def test_garbage_safetensors_is_reported(tmp_path):
    folder = _saved(tmp_path)
    (folder / "deltatune_adapter.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(AdapterFileError, match="corrupt or truncated"):
        dt.load_adapter(_model(), folder)


def test_corrupt_config_json_is_reported(tmp_path):
    folder = _saved(tmp_path)
    (folder / "deltatune_config.json").write_text("{not json")
    with pytest.raises(AdapterFileError, match="not valid JSON"):
        dt.load_adapter(_model(), folder)


def test_missing_config_file_is_reported(tmp_path):
    folder = _saved(tmp_path)
    (folder / "deltatune_config.json").unlink()
    with pytest.raises(AdapterFileError, match="config file is missing"):
        dt.load_adapter(_model(), folder)


def test_missing_path_is_reported(tmp_path):
    with pytest.raises(AdapterFileError, match="does not exist"):
        dt.load_adapter(_model(), tmp_path / "nowhere")


class _Explodes:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.mark.parametrize("filename", ["adapter_model.bin", "adapter.pt"])
def test_pickle_files_are_refused_and_never_unpickled(tmp_path, filename, monkeypatch):
    monkeypatch.chdir(tmp_path)
    folder = tmp_path / "pickled"
    folder.mkdir()
    (folder / filename).write_bytes(pickle.dumps(_Explodes()))
    for target in (folder, folder / filename):
        with pytest.raises(AdapterFileError, match="never unpickles"):
            dt.load_adapter(_model(), target)
    assert not (tmp_path / "pwned").exists()


def test_peft_folder_with_only_a_pickle_is_refused(tmp_path):
    folder = tmp_path / "peftbin"
    folder.mkdir()
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 2, "target_modules": ["first"]}')
    (folder / "adapter_model.bin").write_bytes(pickle.dumps({"x": 1}))
    with pytest.raises(AdapterFileError, match="never unpickles"):
        dt.load_adapter(_model(), folder)


@pytest.mark.skipif(os.geteuid() == 0, reason="root can write anywhere")
def test_unwritable_output_directory_is_reported(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    model = dt.adapt(_model(), dt.LoRAConfig(rank=2))
    with pytest.raises(AdapterFileError, match="not writable"):
        dt.save_adapter(model, locked / "a")


def test_output_under_a_file_is_reported(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    model = dt.adapt(_model(), dt.LoRAConfig(rank=2))
    with pytest.raises(AdapterFileError, match="cannot create output directory"):
        dt.save_adapter(model, blocker / "a")


def test_failed_save_leaves_previous_adapter_intact(tmp_path, monkeypatch):
    folder = _saved(tmp_path)
    before = (folder / "deltatune_adapter.safetensors").read_bytes()
    model = dt.adapt(_model(), dt.LoRAConfig(rank=4))

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("deltatune.core.adapter_files.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        dt.save_adapter(model, folder)
    assert (folder / "deltatune_adapter.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a"]
    assert sorted(p.name for p in folder.iterdir()) == ["deltatune_adapter.safetensors", "deltatune_config.json"]
