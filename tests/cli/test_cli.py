from __future__ import annotations

import subprocess
import sys

import pytest

import deltatune as dt
from contract.toy_models import build
from deltatune.cli import main, parse_method_params
from deltatune.errors import ConfigError


def test_methods_lists_every_registered_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for entry in dt.list_methods():
        assert entry.name in out and entry.description in out


def test_inspect_shows_config_shapes_parameters_and_size(tmp_path, capsys):
    model = dt.adapt(build("linear")[0], dt.LoRAConfig(rank=4))
    dt.save_adapter(model, tmp_path / "a")
    assert main(["inspect", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "method lora" in out and "lora_A (4, 20)" in out and "parameters  " in out and "file size" in out
    assert f"{dt.trainable_parameters(model).trainable:,}" in out


def test_inspect_reads_peft_folders(tmp_path, capsys):
    model = dt.adapt(build("linear")[0], dt.LoRAConfig(rank=4))
    dt.save_adapter(model, tmp_path / "p", format="peft")
    assert main(["inspect", str(tmp_path / "p"), "--json"]) == 0
    assert '"format": "peft"' in capsys.readouterr().out


@pytest.mark.parametrize("argv,message", [
    (["inspect", "/nonexistent/adapter"], "does not exist"),
    (["train", "--method", "lorra"], "unknown method 'lorra'"),
    (["train", "-p", "rank"], "expected KEY=VALUE"),
    (["train", "-p", "rank=abc"], "rank=abc"),
])
def test_errors_are_one_line_without_traceback(argv, message, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_method_params_are_typed_from_the_config_fields():
    params = parse_method_params("lora", ["rank=4", "alpha=16", "rslora=true", "targets=query,value"])
    assert params == {"rank": 4, "alpha": 16.0, "rslora": True, "targets": ("query", "value")}
    with pytest.raises(ConfigError, match="rslora"):
        parse_method_params("lora", ["rslora=maybe"])


def test_console_script_exits_nonzero_with_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "deltatune.cli", "inspect", str(tmp_path / "missing")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("deltatune: error:") and "Traceback" not in result.stderr
