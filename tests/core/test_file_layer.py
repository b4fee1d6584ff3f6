"""The file layer: the (detect, load, save) format table, peft key names computed without touching the model,
the recorded version, and an import graph without circles."""
from __future__ import annotations

import ast
import copy
import importlib.metadata
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import deltatune as dt
from deltatune import version
from deltatune.core import formats
from deltatune.core.attach import attach_adapter
from deltatune.core.blueprint import planned_layers, planned_state_keys
from deltatune.core.files import read_json
from deltatune.core.formats import AdapterFormat, folder_holds, register_format, unregister_format
from deltatune.core.host import AdaptedLayer
from deltatune.core.model import adapter_state
from deltatune.core.peft_format import peft_key_renames
from deltatune.core.registry import entry_for_config, method_entry
from deltatune.errors import AdapterFileError, DeltatuneError

SRC = Path(__file__).resolve().parents[2] / "src" / "deltatune"
TOY_MARKER = "toy_adapter.json"


# --- a toy format: tensors as JSON lists, registered only inside these tests ------------------------------------
def _toy_payload(model: nn.Module, name: str) -> dict:
    config = adapter_state(model).configs[name]
    tensors = {key: tensor.double().tolist() for key, tensor in dt.adapter_state_dict(model, name).items()}
    return {"method": entry_for_config(config).name, "config": config.to_dict(), "tensors": tensors}


def _toy_attach(model, payload, name, trainable, source):
    config = method_entry(payload["method"]).config_cls.from_dict(payload["config"])
    tensors = {key: torch.tensor(values, dtype=torch.float64) for key, values in payload["tensors"].items()}
    return attach_adapter(model, config, tensors, name, trainable, source=source)


def _save_toy_folder(model, path, name):
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / TOY_MARKER).write_text(json.dumps(_toy_payload(model, name)))
    return folder


class ToyCalls:
    def __init__(self):
        self.loads: list[Path] = []

    def load_folder(self, model, location, name, *, trainable, allow_nonfinite):
        self.loads.append(location.folder)
        return _toy_attach(model, read_json(location.folder / TOY_MARKER), name, trainable, location.folder)

    def load_file(self, model, location, name, *, trainable, allow_nonfinite):
        self.loads.append(location.file)
        return _toy_attach(model, read_json(location.file), name, trainable, location.file)


@pytest.fixture
def toy_formats():
    """A folder format ("toy", marker toy_adapter.json) and a single-file format ("toyfile", *.toyfile), as the
    kohya/diffusers files will be: registered here, gone after the test."""
    calls = ToyCalls()
    register_format(AdapterFormat("toy", detect=folder_holds(TOY_MARKER), load=calls.load_folder,
                                  save=_save_toy_folder, marker=TOY_MARKER, files=(TOY_MARKER,)))
    register_format(AdapterFormat("toyfile", detect=lambda where: where.file is not None
                                  and where.file.suffix == ".toyfile", load=calls.load_file))
    yield calls
    unregister_format("toy")
    unregister_format("toyfile")


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()


def _trained(seed: int = 1) -> nn.Module:
    model = dt.adapt(_mlp(), dt.LoRAConfig(rank=2, targets=["0", "2"], init="random"))
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            delta.lora_B.normal_(generator=torch.Generator().manual_seed(seed))
    return model


X = torch.linspace(-1, 1, 20, dtype=torch.float64).reshape(5, 4)


def test_a_registered_folder_format_is_saved_detected_and_loaded_through_the_table(tmp_path, toy_formats):
    trained = _trained()
    folder = dt.save_adapter(trained, tmp_path / "toy", format="toy")
    assert sorted(p.name for p in folder.iterdir()) == [TOY_MARKER]
    loaded = dt.load_adapter(_mlp(), folder)
    assert toy_formats.loads == [folder]
    assert torch.equal(loaded(X), trained(X))
    assert not torch.equal(loaded(X), _mlp()(X))  # the adapter matters


def test_a_registered_single_file_format_is_detected_from_the_file_path(tmp_path, toy_formats):
    trained = _trained()
    path = tmp_path / "mine.toyfile"
    path.write_text(json.dumps(_toy_payload(trained, "default")))
    loaded = dt.load_adapter(_mlp(), path, "mine")
    assert toy_formats.loads == [path]
    assert dt.adapter_names(loaded) == ["mine"] and torch.equal(loaded(X), trained(X))


def test_without_the_entry_the_toy_folder_is_not_an_adapter(tmp_path):
    folder = tmp_path / "toy"
    folder.mkdir()
    (folder / TOY_MARKER).write_text("{}")
    with pytest.raises(AdapterFileError, match="has no deltatune_config.json .deltatune. or adapter_config.json"):
        dt.load_adapter(_mlp(), folder)


def test_a_folder_two_formats_claim_is_refused_naming_both(tmp_path, toy_formats):
    folder = dt.save_adapter(_trained(), tmp_path / "a")
    (folder / TOY_MARKER).write_text(json.dumps(_toy_payload(_trained(), "default")))
    model = _mlp()
    with pytest.raises(AdapterFileError, match=r"several formats \(deltatune, toy\).*ambiguous"):
        dt.load_adapter(model, folder)
    assert dt.adapter_names(model) == [] and toy_formats.loads == []


def test_a_hand_made_folder_with_deltatune_and_peft_configs_is_refused_as_ambiguous(tmp_path):
    folder = dt.save_adapter(_trained(), tmp_path / "a")
    dt.save_adapter(_trained(), tmp_path / "b", format="peft")
    (tmp_path / "b" / "adapter_config.json").rename(folder / "adapter_config.json")
    with pytest.raises(AdapterFileError, match=r"several formats \(deltatune, peft\)"):
        dt.load_adapter(_mlp(), folder / "deltatune_adapter.safetensors")


def test_saving_beside_a_registered_formats_marker_is_refused(tmp_path, toy_formats):
    folder = dt.save_adapter(_trained(), tmp_path / "toy", format="toy")
    with pytest.raises(AdapterFileError, match="already holds a toy adapter"):
        dt.save_adapter(_trained(), folder)


def test_unknown_and_read_only_formats_are_refused_by_name_listing_the_writable_ones(toy_formats):
    for name in ("onnx", "toyfile"):
        with pytest.raises(DeltatuneError, match=f"format='{name}' is unknown; use 'deltatune' or 'peft' or "
                                                 "'diffusers' or 'kohya' or 'toy'"):
            dt.save_adapter(_trained(), "unused", format=name)


def test_a_second_entry_under_a_taken_name_is_refused():
    entry = formats.format_named("deltatune")
    assert register_format(entry) is entry  # re-registering the same entry is harmless
    with pytest.raises(DeltatuneError, match="'deltatune' is registered twice"):
        register_format(AdapterFormat("deltatune", detect=folder_holds("x.json"), load=entry.load))


# --- peft key names from (config, layer name, layer), never from the model -----------------------------------
class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 8)
        self.proj = nn.Linear(8, 8)
        self.attn = Conv1D(12, 8)
        self.conv = nn.Conv2d(3, 6, 3)
        self.head = nn.Linear(8, 2)


EXPECTED_RENAMES = {
    "proj": {"proj.lora_A.weight": "proj.lora_A", "proj.lora_B.weight": "proj.lora_B"},
    "attn": {"attn.lora_A.weight": "attn.lora_A", "attn.lora_B.weight": "attn.lora_B"},
    "conv": {"conv.lora_A.weight": "conv.lora_A", "conv.lora_B.weight": "conv.lora_B"},
    "embed": {"embed.lora_embedding_A": "embed.lora_A", "embed.lora_embedding_B": "embed.lora_B"},
}


def _snapshot(model: nn.Module):
    modules = [(name, type(module), id(module)) for name, module in model.named_modules()]
    state = {key: (tensor.clone(), tensor.data_ptr()) for key, tensor in model.state_dict(keep_vars=True).items()}
    return modules, state, adapter_state(model).configs.copy(), adapter_state(model).active


def _same_snapshot(before, after) -> bool:
    (modules, state, configs, active), (modules2, state2, configs2, active2) = before, after
    return (modules == modules2 and configs == configs2 and active == active2 and state.keys() == state2.keys()
            and all(torch.equal(state[k][0], state2[k][0]) and state[k][1] == state2[k][1] for k in state))


def _computed_names(model: nn.Module, config) -> tuple[dict[str, str], set[str]]:
    renames: dict[str, str] = {}
    for path, layer in planned_layers(model, config):
        renames |= peft_key_renames(config, path, layer)
    return renames, planned_state_keys(model, config)


def _probe_names(model: nn.Module, config) -> tuple[dict[str, str], set[str]]:
    """What the old loader did: adapt a throw-away adapter onto the user's model and read its names."""
    dt.adapt(model, config, "_probe", trainable=False)
    try:
        renames = {f"{path}.{theirs}": f"{path}.{ours}" for path, _, delta in dt.iter_deltas(model, "_probe")
                   for ours, theirs in delta.peft_tensor_names().items()}
        return renames, set(dt.adapter_state_dict(model, "_probe"))
    finally:
        dt.delete_adapter(model, "_probe")


@pytest.mark.parametrize("layer", ["proj", "attn", "conv", "embed"])
@pytest.mark.parametrize("already_adapted", [False, True], ids=["plain", "already-adapted"])
def test_peft_key_names_are_computed_without_touching_the_model_and_match_the_old_probe(layer, already_adapted):
    torch.manual_seed(0)
    model = Mixed()
    if already_adapted:  # the layer is an AdaptedLayer already: names come from its base layer
        dt.adapt(model, dt.LoRAConfig(rank=1, targets=[layer]), "first")
        assert isinstance(model.get_submodule(layer), AdaptedLayer)
    config = dt.LoRAConfig(rank=2, targets=[layer], extra_trainable=["head"])
    before, rng = _snapshot(model), torch.get_rng_state()
    renames, keys = _computed_names(model, config)
    assert _same_snapshot(before, _snapshot(model)) and torch.equal(rng, torch.get_rng_state())
    assert renames == EXPECTED_RENAMES[layer]
    assert keys == {f"{layer}.lora_A", f"{layer}.lora_B", "head.weight", "head.bias"}
    assert (renames, keys) == _probe_names(copy.deepcopy(model), config)


def test_a_peft_load_adds_only_the_loaded_adapter_to_the_model(tmp_path, monkeypatch):
    folder = dt.save_adapter(_trained(), tmp_path / "peft", format="peft")
    added: list[str] = []
    original = AdaptedLayer.add_delta

    def recording(self, name, delta):
        added.append(name)
        return original(self, name, delta)

    monkeypatch.setattr(AdaptedLayer, "add_delta", recording)
    loaded = dt.load_adapter(_mlp(), folder, "mine")
    assert added == ["mine", "mine"] and torch.equal(loaded(X), _trained()(X))


# --- the version a save records -------------------------------------------------------------------------------
def test_the_recorded_version_is_the_package_metadatas(tmp_path):
    installed = importlib.metadata.version("deltatune")
    folder = dt.save_adapter(_trained(), tmp_path / "a")
    assert read_json(folder / "deltatune_config.json")["deltatune_version"] == installed
    assert dt.__version__ == installed == version.package_version()


def test_an_uninstalled_source_tree_reports_a_placeholder_version(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(version.metadata, "version", missing)
    assert version.package_version() == version.UNINSTALLED_VERSION == "0+unknown"


# --- import circles ---------------------------------------------------------------------------------------------
def _modules() -> dict[str, Path]:
    found = {}
    for path in SRC.rglob("*.py"):
        parts = path.relative_to(SRC.parent).with_suffix("").parts
        found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def _import_nodes(node: ast.AST, module_level_only: bool):
    for child in ast.iter_child_nodes(node):
        if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(child, (ast.Import, ast.ImportFrom)):
            yield child
        yield from _import_nodes(child, module_level_only)


def _imported(node: ast.Import | ast.ImportFrom, module: str, is_package: bool, known: dict[str, Path]) -> set[str]:
    """The package modules `node` makes `module` import (an ancestor package only for names defined in it)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:
            anchor = module.split(".")[: len(module.split(".")) - node.level + is_package]
            base = ".".join(anchor + ([base] if base else []))
        submodules = [f"{base}.{alias.name}" for alias in node.names if f"{base}.{alias.name}" in known]
        names = submodules + ([base] if len(submodules) < len(node.names) else [])
    targets = set()
    for name in names:
        while name and name not in known:
            name = name.rpartition(".")[0]
        if name and name != module:
            targets.add(name)
    return targets


def _graph(module_level_only: bool) -> dict[str, set[str]]:
    known = _modules()
    return {module: set().union(*(_imported(node, module, path.name == "__init__.py", known)
                                  for node in _import_nodes(ast.parse(path.read_text()), module_level_only)))
            for module, path in known.items()}


def _circles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    circles = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for successor in graph[node]:
            if successor not in index:
                visit(successor)
                low[node] = min(low[node], low[successor])
            elif successor in stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for node in graph:
        if node not in index:
            visit(node)
    return circles


def test_no_import_circle_through_core_even_counting_imports_inside_functions():
    circles = [c for c in _circles(_graph(module_level_only=False)) if any(m.startswith("deltatune.core") for m in c)]
    assert circles == []


# Being untangled by issue 10 item 3 (the trainer's state as an object): drop it from here when that lands.
def test_no_import_circle_in_the_package_at_module_level():
    assert _circles(_graph(module_level_only=True)) == []


def test_the_circle_check_finds_a_circle_hidden_in_a_function():
    graph = {"a": {"b"}, "b": set(), "c": set()}
    assert _circles(graph) == []
    graph["b"].add("a")
    assert _circles(graph) == [["a", "b"]]
    tree = ast.parse("import os\ndef late():\n    from deltatune.core import state\n")
    assert [type(n).__name__ for n in _import_nodes(tree, True)] == ["Import"]
    late = list(_import_nodes(tree, False))[1]
    assert _imported(late, "deltatune.core.files", False, _modules()) == {"deltatune.core.state"}
