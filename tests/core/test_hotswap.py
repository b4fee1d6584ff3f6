"""Hot-swapping (`deltatune.prepare_hotswap`, `deltatune.hotswap_adapter`): a compiled model serves another saved
adapter (other rank ≤ max, other alpha) with no recompilation and the outputs of a fresh load."""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.testing import CompileCounter

import deltatune as dt
from contract.toy_models import build
from deltatune.errors import ConfigError, HotSwapError


def _saved(tmp_path, base, config, seed: int, folder: str):
    model = dt.adapt(copy.deepcopy(base), config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for parameter in delta.parameters():
                parameter.normal_(0, 0.3, generator=generator)
    return dt.save_adapter(model, tmp_path / folder)


def _fresh(base, folder, x):
    with torch.no_grad():
        return dt.load_adapter(copy.deepcopy(base), folder)(x)


@pytest.fixture()
def lora_folders(tmp_path):
    base, x = build("linear")
    folders = {
        "r4": _saved(tmp_path, base, dt.LoRAConfig(rank=4, alpha=8, targets=None), 1, "r4"),
        "r8": _saved(tmp_path, base, dt.LoRAConfig(rank=8, alpha=3, rslora=True, targets=None), 2, "r8"),
        "r2": _saved(tmp_path, base, dt.LoRAConfig(rank=2, alpha=16, targets=None), 3, "r2"),
    }
    return base, x, folders


def test_swaps_under_torch_compile_without_recompiling_and_equal_a_fresh_load(lora_folders):
    base, x, folders = lora_folders
    torch._dynamo.reset()
    model = dt.load_adapter(copy.deepcopy(base), folders["r4"], "served")
    dt.prepare_hotswap(model, "served", max_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), _fresh(base, folders["r4"], x), rtol=1e-12, atol=1e-12)
        for name in ("r8", "r2", "r4"):
            dt.hotswap_adapter(model, folders[name], "served")
            torch.testing.assert_close(compiled(x), _fresh(base, folders[name], x), rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1, f"{counter.frame_count - 1} recompiles across 3 swaps"
    torch._dynamo.reset()


def test_a_swapped_adapter_saves_as_an_equivalent_lora(lora_folders, tmp_path):
    base, x, folders = lora_folders
    model = dt.load_adapter(copy.deepcopy(base), folders["r4"])
    dt.prepare_hotswap(model, max_rank=8)
    dt.hotswap_adapter(model, folders["r2"])
    again = dt.save_adapter(model, tmp_path / "again")
    torch.testing.assert_close(_fresh(base, again, x), _fresh(base, folders["r2"], x), rtol=1e-12, atol=1e-12)


def test_a_rank_above_the_maximum_and_other_targets_are_refused_by_name_and_change_nothing(lora_folders, tmp_path):
    base, x, folders = lora_folders
    model = dt.load_adapter(copy.deepcopy(base), folders["r2"])
    dt.prepare_hotswap(model, max_rank=4)
    before = model(x)
    with pytest.raises(HotSwapError, match="rank 8 on .* above the prepared max_rank 4"):
        dt.hotswap_adapter(model, folders["r8"])
    narrow = _saved(tmp_path, base, dt.LoRAConfig(rank=2, targets=["first"]), 4, "narrow")
    with pytest.raises(HotSwapError, match=r"no tensor second\.lora_A.*module 'second'"):
        dt.hotswap_adapter(model, narrow)
    other = _saved(tmp_path, base, dt.LoRAConfig(rank=2, bias=True, targets=None), 5, "biased")
    with pytest.raises(HotSwapError, match="bias=True"):
        dt.hotswap_adapter(model, other)
    ssf = _saved(tmp_path, base, dt.config_for("ssf", targets=None), 6, "ssf")
    with pytest.raises(HotSwapError, match="ssf adapter but the loaded one is lora"):
        dt.hotswap_adapter(model, ssf)
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_swapping_before_preparing_and_a_bad_max_rank_are_refused(lora_folders):
    base, _, folders = lora_folders
    model = dt.load_adapter(copy.deepcopy(base), folders["r4"])
    with pytest.raises(HotSwapError, match="not prepared for hot-swapping"):
        dt.hotswap_adapter(model, folders["r2"])
    with pytest.raises(ConfigError, match="max_rank"):
        dt.prepare_hotswap(model, max_rank=2)


def test_a_fixed_shape_method_swaps_as_it_is_under_compile(tmp_path):
    base, x = build("linear")
    first = _saved(tmp_path, base, dt.config_for("ssf", targets=None), 1, "one")
    second = _saved(tmp_path, base, dt.config_for("ssf", targets=None), 2, "two")
    torch._dynamo.reset()
    model = dt.load_adapter(copy.deepcopy(base), first)
    with pytest.raises(HotSwapError, match="no rank to pad"):
        dt.prepare_hotswap(model, max_rank=8)
    counter = CompileCounter()
    compiled = torch.compile(model, backend=counter)
    with torch.no_grad():
        compiled(x)
        dt.hotswap_adapter(model, second)
        torch.testing.assert_close(compiled(x), _fresh(base, second, x), rtol=1e-12, atol=1e-12)
    assert counter.frame_count == 1
    torch._dynamo.reset()
