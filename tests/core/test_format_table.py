"""The format table with every built-in format: what each save writes is claimed by exactly that format and
loads back exactly (methods × layer kinds × formats, float64), kohya round trips as a property over ranks and
alphas, and interrupted single-file writes leave the previous file."""
from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import deltatune as dt
import deltatune.core.foreign_format as foreign_format
from contract.toy_models import build
from deltatune.core.attach import adapter_state_dict
from deltatune.core.formats import detect_format, locate, registered_formats
from deltatune.errors import DeltatuneError, UnsupportedLayerError

FORMATS = ("deltatune", "peft", "kohya", "diffusers")
CONFIGS = {
    "lora": dt.LoRAConfig(rank=2, alpha=3.0, init="random", targets=None),
    "loha": dt.LoHaConfig(rank=2, alpha=5.0, init="random", targets=None),
    "lokr": dt.LoKrConfig(rank=1, alpha=2.0, init="random", targets=None, decompose_both=True),
}


def claimants(path):
    location = locate(path)
    return [entry.name for entry in registered_formats() if entry.detect(location)]


def saved(model, tmp_path, fmt):
    target = tmp_path / ("adapter.safetensors" if fmt == "kohya" else "adapter")
    return dt.save_adapter(model, target, format=fmt)


def outputs(model, x):
    with torch.no_grad():
        return model(x)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("method", CONFIGS)
@pytest.mark.parametrize("kind", ["linear", "conv", "conv1d", "conv1d_hf"])
def test_each_format_claims_only_its_own_files_and_round_trips(tmp_path, fmt, method, kind):
    base, x = build(kind)
    try:
        model = dt.adapt(copy.deepcopy(base), CONFIGS[method])
        path = saved(model, tmp_path, fmt)
    except (UnsupportedLayerError, DeltatuneError) as refusal:  # a pair the method or format does not support
        pytest.skip(f"{method} on {kind} in {fmt}: {refusal}")
    assert claimants(path) == [fmt]
    for file in ([path] if path.is_file() else sorted(path.iterdir())):
        assert detect_format(file)[0].name == fmt
    loaded = dt.load_adapter(copy.deepcopy(base), path)
    ours, again = adapter_state_dict(model), adapter_state_dict(loaded)
    assert ours.keys() == again.keys() and all(torch.equal(ours[k], again[k]) for k in ours)
    torch.testing.assert_close(outputs(loaded, x), outputs(model, x), rtol=1e-12, atol=1e-12)


@settings(max_examples=25, deadline=None)
@given(rank=st.integers(1, 4), alpha=st.floats(0.01, 100, allow_nan=False), rslora=st.booleans())
def test_kohya_round_trips_over_ranks_and_alphas(tmp_path_factory, rank, alpha, rslora):
    base, x = build("linear")
    torch.manual_seed(rank)
    model = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=rank, alpha=alpha, rslora=rslora, init="random"))
    path = dt.save_adapter(model, tmp_path_factory.mktemp("k") / "a.safetensors", format="kohya")
    loaded = dt.load_adapter(copy.deepcopy(base), path)
    ours, again = adapter_state_dict(model), adapter_state_dict(loaded)
    assert all(torch.equal(ours[k], again[k]) for k in ours)
    if rslora:  # written as the kohya alpha α·√r: the same scale up to rounding
        torch.testing.assert_close(outputs(loaded, x), outputs(model, x), rtol=1e-13, atol=1e-13)
    else:
        assert torch.equal(outputs(loaded, x), outputs(model, x))


@pytest.mark.parametrize("fmt", ["kohya", "diffusers"])
def test_an_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch, fmt):
    base, _ = build("linear")
    first = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=2, init="random"))
    path = saved(first, tmp_path, fmt)
    weights = path if path.is_file() else path / "pytorch_lora_weights.safetensors"
    before = weights.read_bytes()

    def dies_halfway(tensors, filename, metadata=None):
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(foreign_format, "save_file", dies_halfway)
    second = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=3, init="random"))
    with pytest.raises(DeltatuneError, match="No space left on device"):
        saved(second, tmp_path, fmt)
    assert weights.read_bytes() == before
    assert sorted(p.name for p in weights.parent.iterdir()) == [weights.name]
