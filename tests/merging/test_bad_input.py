"""Every bad input of the merging issue gives a clear one-line error, and never a partial output."""
from __future__ import annotations

import errno
import hashlib
import json

import pytest
import torch
import yaml

from deltatune.cli import main
from deltatune.errors import AdapterFileError, ConfigError, DeltatuneError, MergeError
from deltatune.merging import config_from_dict, load_config, run_merge
from deltatune.merging.io.checkpoint import ShardWriter
from merging.tiny_checkpoints import make_models, save_checkpoint, tiny_state


@pytest.fixture
def models(tmp_path):
    return make_models(tmp_path)


def _raw(base_dir, dirs, method="ties", **extra):
    return {"merge_method": method, "base_model": str(base_dir) if base_dir else None,
            "models": [{"model": str(d), "parameters": {"weight": 1.0, "density": 0.5}} for d in dirs], **extra}


def _merge(raw, out, **options):
    return run_merge(config_from_dict(raw), out, progress=False, **options)


def _one_line(error: BaseException) -> str:
    message = str(error)
    assert "\n" not in message and len(message) < 400
    return message


def _expect(error_type, match, function, *args, **kwargs):
    with pytest.raises(error_type) as caught:
        function(*args, **kwargs)
    message = _one_line(caught.value)
    assert match in message, message


def test_mismatched_tensor_names_name_the_first_difference(models, tmp_path):
    base_dir, dirs, base, _ = models
    state = tiny_state(5)
    del state["model.layers.1.mlp.up_proj.weight"]
    odd = save_checkpoint(state, tmp_path / "odd")
    _expect(MergeError, "'model.layers.1.mlp.up_proj.weight' is missing", _merge, _raw(base_dir, [dirs[0], odd]),
            tmp_path / "out")
    state = tiny_state(6)
    state["extra.bias"] = torch.zeros(2)
    extra = save_checkpoint(state, tmp_path / "extra")
    _expect(MergeError, "'extra.bias' is extra", _merge, _raw(base_dir, [extra]), tmp_path / "out")


def test_mismatched_shapes(models, tmp_path):
    base_dir, dirs, _, _ = models
    state = tiny_state(5)
    state["model.norm.weight"] = torch.ones(7)
    wide = save_checkpoint(state, tmp_path / "wide")
    _expect(MergeError, "'model.norm.weight' has shape (7,)", _merge, _raw(base_dir, [dirs[0], wide]),
            tmp_path / "out")


def test_different_dtypes_need_an_explicit_working_dtype(models, tmp_path):
    base_dir, dirs, _, _ = models
    half = save_checkpoint(tiny_state(5, torch.bfloat16), tmp_path / "half")
    _expect(MergeError, "set dtype:", _merge, _raw(base_dir, [dirs[0], half]), tmp_path / "out")
    assert _merge(_raw(base_dir, [dirs[0], half], dtype="float32"), tmp_path / "out").tensors == 12


def test_missing_base(models, tmp_path):
    base_dir, dirs, _, _ = models
    _expect(MergeError, "needs base_model", _merge, _raw(None, dirs), tmp_path / "out")
    _expect(MergeError, "does not exist", _merge, _raw(tmp_path / "nowhere", dirs), tmp_path / "out")


def test_corrupt_and_truncated_shards(models, tmp_path):
    base_dir, dirs, _, _ = models
    shard = sorted(dirs[1].glob("*.safetensors"))[0]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 10])
    _expect(MergeError, "is truncated", _merge, _raw(base_dir, dirs), tmp_path / "out")
    shard.write_bytes(data[:8] + b"{not json" + data[17:])
    _expect(MergeError, "is corrupt", _merge, _raw(base_dir, dirs), tmp_path / "out")
    shard.write_bytes(b"\x00\x01")
    _expect(MergeError, "truncated", _merge, _raw(base_dir, dirs), tmp_path / "out")
    shard.write_bytes((10**12).to_bytes(8, "little") + data[8:])
    _expect(MergeError, "header claims", _merge, _raw(base_dir, dirs), tmp_path / "out")
    (dirs[1] / "model.safetensors.index.json").write_text("{")
    _expect(MergeError, "index.json is corrupt", _merge, _raw(base_dir, dirs), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_that_do_not_sum_as_the_method_requires(models, tmp_path):
    base_dir, dirs, _, _ = models
    soup = {"merge_method": "linear", "models": [{"model": str(d), "parameters": {"weight": 0.8}} for d in dirs],
            "parameters": {"normalize": False}}
    _expect(MergeError, "sum to 1", _merge, soup, tmp_path / "out")
    cancel = {"merge_method": "task_arithmetic", "base_model": str(base_dir), "parameters": {"normalize": True},
              "models": [{"model": str(dirs[0]), "parameters": {"weight": 1.0}},
                         {"model": str(dirs[1]), "parameters": {"weight": -1.0}}]}
    _expect(MergeError, "sum to 0", _merge, cancel, tmp_path / "out")


def test_output_overlapping_an_input_is_refused(models, tmp_path):
    base_dir, dirs, _, _ = models
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in sorted(dirs[0].iterdir()))).hexdigest()
    for out in (dirs[0], dirs[0] / "merged", tmp_path):
        _expect(MergeError, "overlaps the input", _merge, _raw(base_dir, dirs), out, overwrite=True)
    assert hashlib.sha256(b"".join(p.read_bytes() for p in sorted(dirs[0].iterdir()))).hexdigest() == digest


def test_existing_output_needs_overwrite(models, tmp_path):
    base_dir, dirs, _, _ = models
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    _expect(MergeError, "--overwrite", _merge, _raw(base_dir, dirs), tmp_path / "out")
    _merge(_raw(base_dir, dirs), tmp_path / "out", overwrite=True)
    assert not (tmp_path / "out" / "keep.txt").exists()


def test_disk_error_mid_write_leaves_nothing_behind(models, tmp_path, monkeypatch):
    base_dir, dirs, _, _ = models
    original, written = ShardWriter.write, []

    def failing_write(self, name, tensor):
        if len(written) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        written.append(name)
        original(self, name, tensor)

    monkeypatch.setattr(ShardWriter, "write", failing_write)
    _expect(AdapterFileError, "No space left on device; free disk space", _merge, _raw(base_dir, dirs),
            tmp_path / "out", shard_bytes=400)
    assert not (tmp_path / "out").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "ft0", "ft1", "ft2"]


def test_a_failed_overwrite_keeps_the_previous_output(models, tmp_path, monkeypatch):
    base_dir, dirs, _, _ = models
    _merge(_raw(base_dir, dirs), tmp_path / "out")
    before = sorted(p.name for p in (tmp_path / "out").iterdir())
    monkeypatch.setattr(ShardWriter, "write", lambda *a: (_ for _ in ()).throw(OSError(errno.EIO, "I/O error")))
    _expect(MergeError, "I/O error", _merge, _raw(base_dir, dirs), tmp_path / "out", overwrite=True)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == before


@pytest.mark.parametrize("raw,match", [
    ({"merge_method": "ties_merging", "models": ["a"]}, "unknown merge_method 'ties_merging'"),
    ({"merge_method": "ties", "models": []}, "non-empty list"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"densty": 0.5}}]}, "unknown parameter 'densty'"),
    ({"merge_method": "ties", "models": [{"model": "a", "parameters": {"normalize": True}}]}, "shared parameter"),
    ({"merge_method": "ties", "models": ["a"], "parameters": {"scale": 1}}, "unknown parameter 'scale'"),
    ({"merge_method": "ties", "slices": []}, "slices: expected a non-empty list"),
    ({"merge_method": "ties", "modules": {}}, "not supported yet"),
    ({"merge_method": "ties", "models": ["a@main"]}, "@revision/+lora"),
    ({"merge_method": "ties", "models": ["a"], "dtype": "float8"}, "dtype='float8'"),
    ({"merge_method": "ties", "models": ["a"], "semantics": "faithful"}, "semantics='faithful'"),
    ({"models": ["a"]}, "merge_method is missing"),
    ({"merge_method": "ties", "models": ["a"], "parameters": {"scaling": 1, "lambda": 2}}, "'lambda' and 'scaling'"),
])
def test_config_errors_are_one_line(raw, match):
    _expect(ConfigError, match, config_from_dict, raw)


def test_parameter_values_are_checked_per_tensor_before_reading(models, tmp_path):
    base_dir, dirs, _, _ = models
    raw = _raw(base_dir, dirs)
    raw["models"][0]["parameters"]["density"] = [{"filter": "mlp", "value": 1.5}, {"value": 0.5}]
    _expect(ConfigError, "density=1.5", _merge, raw, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_bad_yaml_file(tmp_path):
    (tmp_path / "bad.yaml").write_text("merge_method: ties\nmodels: [a\n")
    _expect(ConfigError, "not valid YAML at line", load_config, tmp_path / "bad.yaml")
    _expect(ConfigError, "does not exist", load_config, tmp_path / "none.yaml")


def test_cli_prints_one_line_without_traceback(models, tmp_path, capsys):
    base_dir, dirs, _, _ = models
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(_raw(base_dir, dirs)))
    assert main(["merge", str(tmp_path / "m.yaml"), "--out", str(dirs[0])]) == 2
    err = capsys.readouterr().err
    assert err.startswith("deltatune: error:") and "overlaps" in err and len(err.strip().splitlines()) == 1
    assert issubclass(MergeError, DeltatuneError)
    assert json.loads((dirs[0] / "config.json").read_text())["num_hidden_layers"] == 3
