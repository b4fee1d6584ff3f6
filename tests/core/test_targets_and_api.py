from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import deltatune as dt
from contract.toy_models import build
from deltatune.core.host import AdaptedLayer
from deltatune.errors import AdapterNameError, DeltatuneError, TargetError


class Tower(nn.Module):
    """Nested names like a transformer: block.0.attn.query, ..., and a `head` output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.block = nn.ModuleList(nn.ModuleDict({
            "query": nn.Linear(16, 16), "value": nn.Linear(16, 16), "mlp": nn.Linear(16, 16),
            "norm": nn.LayerNorm(16), "conv": nn.Conv1d(16, 16, 3, padding=1),
        }) for _ in range(2))
        self.head = nn.Linear(16, 4)

    def get_output_embeddings(self):
        return self.head

    def forward(self, ids):
        h = self.embed(ids)
        for block in self.block:
            h = block["norm"](h + block["query"](h) * torch.sigmoid(block["value"](h)) + block["mlp"](h))
            h = h + block["conv"](h.transpose(1, 2)).transpose(1, 2)
        return self.head(h.mean(1))


def _adapted_paths(model):
    return sorted(p for p, m in model.named_modules() if isinstance(m, AdaptedLayer))


@pytest.mark.parametrize("targets,layer_types,expected", [
    (["query", "value"], (), ["block.0.query", "block.0.value", "block.1.query", "block.1.value"]),
    (r"block\.1\.(query|mlp)", (), ["block.1.mlp", "block.1.query"]),
    ("all-linear", (), [f"block.{i}.{n}" for i in range(2) for n in ("mlp", "query", "value")]),
    (None, ("conv",), ["block.0.conv", "block.1.conv"]),
    (None, ("Embedding",), ["embed"]),
    (["block.0.query"], (), ["block.0.query"]),
])
def test_target_selection(targets, layer_types, expected):
    model = dt.adapt(Tower(), dt.LoRAConfig(rank=2, targets=targets, layer_types=layer_types))
    assert _adapted_paths(model) == expected


def test_all_linear_skips_output_head_and_extra_trainable():
    model = dt.adapt(Tower(), dt.LoRAConfig(rank=2, extra_trainable=("block.1.mlp",)))
    paths = _adapted_paths(model)
    assert "head" not in paths and "block.1.mlp" not in paths
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert {"block.1.mlp.weight", "block.1.mlp.bias"} <= trainable
    assert not any(n.startswith("head") for n in trainable)


def test_exclude_and_unsupported_named_layer():
    model = dt.adapt(Tower(), dt.LoRAConfig(rank=2, targets=["query"], exclude=["block.0.query"]))
    assert _adapted_paths(model) == ["block.1.query"]
    with pytest.raises(TargetError, match=r"cannot adapt 'block.0.norm' \(LayerNorm\)"):
        dt.adapt(Tower(), dt.LoRAConfig(rank=2, targets=["norm"]))


def test_extra_trainable_matching_nothing_is_an_error():
    with pytest.raises(TargetError, match="extra_trainable"):
        dt.adapt(Tower(), dt.LoRAConfig(rank=2, extra_trainable=("classifier",)))


def test_trainable_count_and_freezing():
    model = dt.adapt(Tower(), dt.LoRAConfig(rank=2, targets=["query"], extra_trainable=("head",)))
    count = dt.trainable_parameters(model)
    lora = 2 * (2 * 16 + 16 * 2)  # two query layers, A (2x16) and B (16x2)
    head = 16 * 4 + 4
    assert count.trainable == lora + head
    assert count.total == sum(p.numel() for p in Tower().parameters()) + lora
    assert "trainable%" in str(count)


def test_extra_trainable_module_is_saved_and_restored(tmp_path):
    torch.manual_seed(0)
    base = Tower()
    config = dt.LoRAConfig(rank=2, targets=["query"], extra_trainable=("head",), init="random")
    model = dt.adapt(copy.deepcopy(base), config)
    with torch.no_grad():
        model.head.weight.add_(1.0)
    ids = torch.randint(0, 50, (3, 5))
    expected = model(ids)
    dt.save_adapter(model, tmp_path / "a")
    restored = dt.load_adapter(copy.deepcopy(base), tmp_path / "a")
    torch.testing.assert_close(restored(ids), expected, rtol=0, atol=0)


def test_active_set_errors_and_disabled_while_merged():
    model = dt.adapt(build("linear")[0], dt.LoRAConfig(rank=2))
    with pytest.raises(AdapterNameError, match="no adapter named 'nope'"):
        dt.set_active(model, "nope")
    dt.merge(model)
    with pytest.raises(DeltatuneError, match="unmerge"):
        with dt.disabled(model):
            pass
    with pytest.raises(DeltatuneError, match="unmerge"):
        dt.set_active(model, "default")


def test_delete_adapter_restores_plain_layers():
    base, x = build("linear")
    model = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=2, init="random"))
    dt.delete_adapter(model, "default")
    assert not _adapted_paths(model)
    torch.testing.assert_close(model(x), base(x))


def test_unload_without_merge_restores_base():
    base, x = build("linear")
    model = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=2, init="random"))
    dt.merge(model)
    plain = dt.unload(model, merge=False)
    torch.testing.assert_close(plain(x), base(x), rtol=0, atol=1e-12)


def test_regularization_loss_is_zero_for_lora():
    model = dt.adapt(build("linear")[0], dt.LoRAConfig(rank=2))
    assert dt.regularization_loss(model).item() == 0.0


def test_full_state_dict_round_trips_through_load_state_dict():
    base, x = build("linear")
    model = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=2, init="random"))
    clone = dt.adapt(copy.deepcopy(base), dt.LoRAConfig(rank=2))
    clone.load_state_dict(model.state_dict())
    torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_public_functions_are_not_shadowed_by_subpackages():
    """Importing every subpackage must leave the public API's functions callable: a subpackage named like a
    public function (a `deltatune/merge/` next to `deltatune.merge(model)`) replaces the function on import."""
    import importlib
    import pkgutil

    for info in pkgutil.walk_packages(dt.__path__, prefix="deltatune."):
        if not info.name.endswith(("__main__", "build_wordnet")):
            importlib.import_module(info.name)
    for name in dt.__all__:
        assert not isinstance(getattr(dt, name), type(dt)), f"deltatune.{name} is a module, not the public API"


def test_every_registered_method_config_is_exported_at_the_top_level():
    """The one-line promise `deltatune.adapt(model, deltatune.SaRAConfig())` holds for every built-in method."""
    for entry in dt.list_methods():
        name = entry.config_cls.__name__
        assert getattr(dt, name, None) is entry.config_cls, f"deltatune.{name} missing"
        assert name in dt.__all__
