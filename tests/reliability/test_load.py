"""Loading adapter files nobody here wrote: fuzzed configs, headers and bodies, and broken folders through the CLI.

The property of every fuzzed file: `load_adapter` either succeeds with exactly what the file says (the saved
model's outputs when the file is unchanged in meaning; the tensors an independent safetensors reader finds
otherwise) or raises one deltatune error with a one-line message; after a failure the model is byte-identical,
and the input files never change.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
import os
import shutil
import struct
import subprocess
import tempfile
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from torch import nn

import deltatune as dt
from deltatune.core.model import adapter_state
from deltatune.errors import DeltatuneError
from reliability.support import assert_one_line_error, assert_one_line_message, run_cli, tree_digest

# A fixed, modest budget (DELTATUNE_FUZZ_EXAMPLES=2000 for a long hunt); derandomized: the same cases every run.
FUZZ = settings(max_examples=int(os.environ.get("DELTATUNE_FUZZ_EXAMPLES", 60)), derandomize=True, deadline=None,
                database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
CONFIG = {"deltatune": "deltatune_config.json", "peft": "adapter_config.json"}
WEIGHTS = {"deltatune": "deltatune_adapter.safetensors", "peft": "adapter_model.safetensors"}
LORA = dict(rank=2, alpha=3.0, targets=("0", "3"))
INPUT = torch.randn(5, 4, generator=torch.Generator().manual_seed(1))


# --- the saved adapters -----------------------------------------------------------------------------------------
def base_model(norm: bool) -> nn.Module:
    """Linear, (BatchNorm,) ReLU, Linear: the norm's running statistics travel in deltatune files only."""
    torch.manual_seed(0)
    middle = nn.BatchNorm1d(6) if norm else nn.Identity()
    return nn.Sequential(nn.Linear(4, 6), middle, nn.ReLU(), nn.Linear(6, 3)).eval()


def saved_model(format: str) -> nn.Module:
    model = dt.adapt(base_model(norm=format == "deltatune"), dt.LoRAConfig(**LORA))
    generator = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for _, _, delta in dt.iter_deltas(model):
            for tensor in delta.parameters():
                tensor.copy_(torch.randn(tensor.shape, generator=generator))
        if format == "deltatune":
            model[1].running_mean.copy_(torch.randn(6, generator=generator))
            model[1].running_var.copy_(torch.rand(6, generator=generator) + 0.5)
            model[1].num_batches_tracked.fill_(7)
    return model.eval()


def save_with_peft(folder: Path) -> nn.Module:
    """The adapter written by peft itself (all of LoraConfig's fields, no deltatune record), same values."""
    from peft import LoraConfig, get_peft_model

    ours = saved_model("peft")
    model = get_peft_model(base_model(norm=False), LoraConfig(r=LORA["rank"], lora_alpha=LORA["alpha"],
                                                             target_modules=list(LORA["targets"])))
    with torch.no_grad():
        for path, _, delta in dt.iter_deltas(ours):
            layer = model.base_model.model.get_submodule(path)
            layer.lora_A["default"].weight.copy_(delta.lora_A)
            layer.lora_B["default"].weight.copy_(delta.lora_B)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(str(folder))
    return ours.eval()


@pytest.fixture(scope="module")
def templates(tmp_path_factory) -> dict[str, tuple[Path, torch.Tensor]]:
    """format -> (a saved adapter folder, the saved model's outputs on INPUT). The peft folder is peft's own."""
    root = tmp_path_factory.mktemp("templates")
    model = saved_model("deltatune")
    dt.save_adapter(model, root / "deltatune")
    peft_model = save_with_peft(root / "peft")
    return {"deltatune": (root / "deltatune", outputs(model)), "peft": (root / "peft", outputs(peft_model))}


def copy_of(template: Path, into: str) -> Path:
    folder = Path(into) / "adapter"
    shutil.copytree(template, folder)
    return folder


# --- what every fuzzed load must satisfy ------------------------------------------------------------------------
def model_digest(model: nn.Module) -> str:
    """Every state-dict entry (name, dtype, shape, bytes), the module tree and the trainable flags."""
    digest = hashlib.sha256()
    for key, tensor in sorted(model.state_dict().items()):
        digest.update(f"{key}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    digest.update(repr([(n, type(m).__name__) for n, m in model.named_modules()]).encode())
    digest.update(repr([(n, p.requires_grad) for n, p in model.named_parameters()]).encode())
    return digest.hexdigest()


def load_or_refuse(folder: Path, norm: bool) -> nn.Module | None:
    """Load `folder` onto a fresh base model: the adapted model, or None after a clean refusal."""
    model = base_model(norm)
    before, inputs = model_digest(model), tree_digest(folder)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            dt.load_adapter(model, folder)
    except DeltatuneError as error:
        assert_one_line_message(error)
        assert len(str(error).splitlines()) == 1, repr(str(error))  # no \r, \x1c, \u2028 ... either
        assert model_digest(model) == before, f"a failed load changed the model: {error}"
        return None
    finally:
        assert tree_digest(folder) == inputs, "a load changed its input files"
    return model


def outputs(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(INPUT)


# --- random JSON ------------------------------------------------------------------------------------------------
SCALARS = (st.none() | st.booleans() | st.integers(-3, 10) | st.integers() | st.floats(allow_nan=True)
           | st.text(max_size=6)
           | st.sampled_from(["lora", "LORA", "deltatune", "0", "3", "kaiming", "2", "all-linear"]))
JSON_VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=6)


def mutated(document: dict, data: st.DataObject, paths: list[tuple[str, ...]]) -> dict:
    """`document` with one to three fields (at `paths`, or new ones) replaced, added or removed."""
    document = copy.deepcopy(document)
    for _ in range(data.draw(st.integers(1, 3), label="mutations")):
        path = data.draw(st.sampled_from(paths), label="path")
        parent = document
        for key in path[:-1]:
            if not isinstance(parent.get(key), dict):
                break
            parent = parent[key]
        else:
            operation = data.draw(st.sampled_from(["replace", "remove", "add"]), label="operation")
            if operation == "remove":
                parent.pop(path[-1], None)
            elif operation == "add":
                parent[data.draw(st.text(min_size=1, max_size=8), label="new key")] = data.draw(JSON_VALUES)
            else:
                parent[path[-1]] = data.draw(JSON_VALUES, label="value")
    return document


def key_paths(document: dict, extra: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    paths = [(key,) for key in [*document, *extra]]
    for key, value in document.items():
        if isinstance(value, dict):
            paths += [(key, inner) for inner in value]
    return paths


def garbled(text: bytes, data: st.DataObject) -> bytes:
    """Truncated, byte-flipped, non-UTF-8 or nested-too-deep versions of a JSON file."""
    kind = data.draw(st.sampled_from(["truncate", "flip", "non-utf8", "deep", "bom", "huge-int"]), label="garble")
    if kind == "truncate":
        return text[: data.draw(st.integers(0, len(text) - 1), label="length")]
    if kind == "flip":
        at = data.draw(st.integers(0, len(text) - 1), label="at")
        return text[:at] + bytes([text[at] ^ data.draw(st.integers(1, 255), label="mask")]) + text[at + 1:]
    if kind == "non-utf8":
        at = data.draw(st.integers(0, len(text)), label="at")
        return text[:at] + b"\xff\xfe\xc3" + text[at:]
    if kind == "deep":
        return b"[" * 100_000 + b"]" * 100_000
    if kind == "bom":
        return b"\xef\xbb\xbf" + text
    return text.replace(b'"rank"', b'"rank": ' + b"9" * 5000 + b', "x"').replace(b'"r"', b'"r": ' + b"9" * 5000
                                                                               + b', "x"')


# --- config JSON: deltatune -------------------------------------------------------------------------------------
def same_value(loaded: Any, written: Any) -> bool:
    """`loaded` (a config field after loading) is `written` (the file's value) taken literally: no string read
    as a number, no number read as a boolean; an integer is a fine float and a list a fine tuple."""
    if isinstance(written, bool) or isinstance(loaded, bool):
        return type(written) is type(loaded) and written == loaded
    if isinstance(written, (int, float)) and isinstance(loaded, (int, float)):
        return float(written) == float(loaded)
    if isinstance(written, (list, tuple)) and isinstance(loaded, (list, tuple)):
        return len(written) == len(loaded) and all(same_value(a, b) for a, b in zip(loaded, written))
    if isinstance(written, str) and isinstance(loaded, (list, tuple)):  # a single target name
        return list(loaded) == [written]
    if written is None and isinstance(loaded, (list, tuple)):  # documented: None is an empty list
        return len(loaded) == 0
    return type(written) is type(loaded) and written == loaded


def check_deltatune_success(model: nn.Module, meta: dict, template: tuple[Path, torch.Tensor]) -> None:
    """A mutated deltatune config that loaded must have been taken literally, with the file's tensors."""
    loaded = adapter_state(model).configs["default"]
    written = meta["config"]
    defaults = type(loaded)()
    for field, value in loaded.to_dict().items():
        expected = written[field] if field in written else getattr(defaults, field)
        assert same_value(value, expected), (field, value, expected)
    original = dt.LoRAConfig(**LORA)
    if loaded == original:
        torch.testing.assert_close(outputs(model), template[1], rtol=0, atol=0)
        return
    rebuilt = dt.adapt(base_model(norm=True), loaded)  # what the file says, put together by hand
    tensors = load_file(str(template[0] / WEIGHTS["deltatune"]))
    with torch.no_grad():
        for key, target in dt.adapter_state_dict(rebuilt).items():
            target.copy_(tensors[key])
        for key in ("running_mean", "running_var", "num_batches_tracked"):
            getattr(rebuilt[1], key).copy_(tensors[f"1.{key}"])
    torch.testing.assert_close(outputs(model), outputs(rebuilt), rtol=0, atol=0, equal_nan=True)


@FUZZ
@given(data=st.data())
def test_fuzzed_deltatune_configs_load_literally_or_fail_in_one_line(templates, data):
    template = templates["deltatune"]
    meta = json.loads((template[0] / CONFIG["deltatune"]).read_text())
    with tempfile.TemporaryDirectory() as work:
        folder = copy_of(template[0], work)
        changed = mutated(meta, data, key_paths(meta, extra=("config",)))
        (folder / CONFIG["deltatune"]).write_text(json.dumps(changed))
        model = load_or_refuse(folder, norm=True)
        if model is not None:
            check_deltatune_success(model, changed, (folder, template[1]))


@FUZZ
@given(data=st.data())
def test_garbled_config_bytes_fail_in_one_line(templates, data):
    format = data.draw(st.sampled_from(sorted(CONFIG)), label="format")
    template = templates[format]
    with tempfile.TemporaryDirectory() as work:
        folder = copy_of(template[0], work)
        path = folder / CONFIG[format]
        text = path.read_bytes()
        bad = garbled(text, data)
        path.write_bytes(bad)
        model = load_or_refuse(folder, norm=format == "deltatune")
        if model is not None:  # only a garble that left valid JSON: loaded as it reads now
            changed = json.loads(bad.decode("utf-8-sig"))
            if format == "deltatune":
                check_deltatune_success(model, changed, (folder, template[1]))
            else:
                check_as_peft_does(model, folder, json.loads(text))


# --- config JSON: peft ------------------------------------------------------------------------------------------
def peft_field_names() -> tuple[str, ...]:
    import dataclasses

    from peft import LoraConfig

    return tuple(f.name for f in dataclasses.fields(LoraConfig))


# deltatune adapts the modules the file holds LoRA tensors for, whatever these say (methods/lora_peft.py)
MATCHING_FIELDS = ("target_modules", "exclude_modules", "layers_to_transform", "layers_pattern")


def peft_outputs(folder: Path, matching: dict | None = None) -> torch.Tensor | Exception:
    """What peft itself makes of `folder`: the adapted model's outputs, or the exception it raised. A field
    set to null is read as unset (deltatune's reading; peft itself crashes on some, e.g. alpha_pattern=null);
    `matching` gives the module-matching fields back their saved values."""
    from peft import PeftModel

    with tempfile.TemporaryDirectory() as work:
        shown = Path(shutil.copytree(folder, Path(work) / "peft"))
        config = json.loads((shown / CONFIG["peft"]).read_text())
        config = {k: v for k, v in config.items() if v is not None}
        if matching is not None:
            config = {k: v for k, v in config.items() if k not in MATCHING_FIELDS} | matching
        (shown / CONFIG["peft"]).write_text(json.dumps(config))
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = PeftModel.from_pretrained(base_model(norm=False), str(shown))
            return outputs(model)
        except Exception as error:  # noqa: BLE001 - peft's verdict, compared below
            return error


def check_as_peft_does(model: nn.Module, folder: Path, saved_config: dict) -> None:
    theirs = peft_outputs(folder, {k: saved_config[k] for k in MATCHING_FIELDS if k in saved_config})
    assert not isinstance(theirs, Exception), f"deltatune loaded a config peft refuses: {theirs!r}"
    torch.testing.assert_close(outputs(model), theirs, rtol=1e-6, atol=1e-6)


@FUZZ
@given(data=st.data())
def test_fuzzed_peft_configs_load_as_peft_does_or_fail_in_one_line(templates, data):
    template = templates["peft"]
    peft_config = json.loads((template[0] / CONFIG["peft"]).read_text())
    with tempfile.TemporaryDirectory() as work:
        folder = copy_of(template[0], work)
        changed = mutated(peft_config, data, key_paths(peft_config, extra=peft_field_names()))
        (folder / CONFIG["peft"]).write_text(json.dumps(changed))
        model = load_or_refuse(folder, norm=False)
        if model is not None:  # accepted: peft must read the file the same way
            check_as_peft_does(model, folder, peft_config)


# --- safetensors header and body --------------------------------------------------------------------------------
DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
DTYPE_NAMES = st.sampled_from([*DTYPES, "F8_E4M3", "U16", "C64", "f32", "float32", "", "F32 "]) | JSON_VALUES
SHAPES = st.lists(st.integers(-2, 8) | st.sampled_from([2**31, 2**63 - 1, 2**64]), max_size=4) | JSON_VALUES
OFFSETS = st.lists(st.integers(-8, 400) | st.sampled_from([2**32, 2**63, 2**64 + 3]), max_size=3) | JSON_VALUES


def split(data: bytes) -> tuple[dict, bytes]:
    (length,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + length]), data[8 + length:]


def joined(header: Any, body: bytes, length_change: int = 0) -> bytes:
    text = json.dumps(header, separators=(",", ":")).encode()
    return struct.pack("<Q", max(0, len(text) + length_change) % 2**64) + text + body


def strict_read(data: bytes) -> dict[str, torch.Tensor] | None:
    """An independent reader of the safetensors format: the tensors, or None when `data` breaks a rule (a
    header length past the end, a header that is not a JSON object of well-formed entries, a dtype or shape
    that does not fit its byte range, ranges that do not tile the body exactly)."""
    if len(data) < 8:
        return None
    (length,) = struct.unpack("<Q", data[:8])
    if 8 + length > len(data):
        return None
    try:
        header = json.loads(data[8: 8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        return None
    if not isinstance(header, dict):
        return None
    metadata = header.pop("__metadata__", {})
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        return None
    body, entries = data[8 + length:], []
    for name, entry in header.items():
        if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= set(entry):
            return None  # other keys in an entry carry no meaning: safetensors ignores them
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPES:
            return None
        ints = lambda values: isinstance(values, list) and all(type(v) is int and v >= 0 for v in values)  # noqa: E731
        if not ints(shape) or not ints(offsets) or len(offsets) != 2 or offsets[0] > offsets[1]:
            return None
        if math.prod(shape) * torch.empty((), dtype=DTYPES[dtype]).element_size() != offsets[1] - offsets[0]:
            return None
        entries.append((offsets, name, DTYPES[dtype], shape))
    end = 0
    for (begin, stop), *_ in sorted(entries):
        if begin != end:
            return None
        end = stop
    if end != len(body):
        return None
    tensors = {}
    for (begin, stop), name, dtype, shape in entries:
        raw = torch.empty(0, dtype=torch.uint8)
        if stop > begin:
            raw = torch.frombuffer(bytearray(body[begin:stop]), dtype=torch.uint8)
        tensors[name] = raw.view(dtype).reshape(shape)
    return tensors


def corrupted(data: bytes, draw: st.DataObject) -> bytes:
    header, body = split(data)
    names = sorted(k for k in header if k != "__metadata__")
    kind = draw.draw(st.sampled_from(["length", "header", "entry", "field", "rename", "drop", "metadata",
                                      "truncate", "flip", "append", "nonfinite"]), label="corruption")
    if kind == "length":
        change = draw.draw(st.integers(-40, 40).filter(bool) | st.sampled_from([2**40, 2**63, -len(data)]),
                           label="length change")
        return joined(header, body, change)
    if kind == "header":
        return joined(draw.draw(JSON_VALUES, label="header"), body)
    if kind in ("entry", "field", "rename", "drop"):
        name = draw.draw(st.sampled_from(names), label="tensor")
        if kind == "entry":
            header[name] = draw.draw(JSON_VALUES, label="entry")
        elif kind == "rename":
            header[draw.draw(st.text(max_size=12) | st.sampled_from([n + "x" for n in names]), label="new name")] = \
                header.pop(name)
        elif kind == "drop":
            del header[name]
        else:
            field = draw.draw(st.sampled_from(["dtype", "shape", "data_offsets", "extra"]), label="field")
            strategy = {"dtype": DTYPE_NAMES, "shape": SHAPES, "data_offsets": OFFSETS, "extra": JSON_VALUES}[field]
            header[name][field] = draw.draw(strategy, label=field)
        return joined(header, body)
    if kind == "metadata":
        header["__metadata__"] = draw.draw(JSON_VALUES | st.dictionaries(st.sampled_from(
            ["format", "method", "deltatune_config_sha256"]), st.text(max_size=4), max_size=2), label="metadata")
        return joined(header, body)
    prefix = data[: len(data) - len(body)]
    if kind == "truncate":
        return data[: draw.draw(st.integers(0, len(data) - 1), label="length")]
    if kind == "flip":
        at = draw.draw(st.integers(0, len(data) - 1), label="at")
        return data[:at] + bytes([data[at] ^ draw.draw(st.integers(1, 255), label="mask")]) + data[at + 1:]
    if kind == "append":
        return data + draw.draw(st.binary(min_size=1, max_size=16), label="tail")
    name = draw.draw(st.sampled_from([n for n in names if header[n]["dtype"] == "F32"]), label="tensor")
    begin, stop = header[name]["data_offsets"]
    at = begin + 4 * draw.draw(st.integers(0, (stop - begin) // 4 - 1), label="element")
    value = draw.draw(st.sampled_from([math.nan, math.inf, -math.inf]), label="value")
    return prefix + body[:at] + struct.pack("<f", value) + body[at + 4:]


def rebuilt_from(tensors: dict[str, torch.Tensor], format: str) -> nn.Module:
    """The saved model put together by hand from independently read tensors."""
    model = dt.adapt(base_model(norm=format == "deltatune"), dt.LoRAConfig(**LORA))
    with torch.no_grad():
        for key, target in dt.adapter_state_dict(model).items():
            path, name = key.rsplit(".", 1)
            target.copy_(tensors[key] if format == "deltatune" else tensors[f"base_model.model.{path}.{name}.weight"])
        if format == "deltatune":
            for key in ("running_mean", "running_var", "num_batches_tracked"):
                getattr(model[1], key).copy_(tensors[f"1.{key}"])
    return model


@FUZZ
@given(data=st.data())
def test_fuzzed_safetensors_files_load_what_they_hold_or_fail_in_one_line(templates, data):
    """Deltatune files with their weights record (any change is refused), without it (the file's own checks
    must hold), and peft files (no record unless deltatune wrote them; the record is fuzzed with the metadata)."""
    variant = data.draw(st.sampled_from(["deltatune", "deltatune-unrecorded", "peft"]), label="variant")
    format = variant.split("-")[0]
    with tempfile.TemporaryDirectory() as work:
        folder = copy_of(templates[format][0], work)
        if variant == "deltatune-unrecorded":
            config = folder / CONFIG[format]
            meta = json.loads(config.read_text())
            config.write_text(json.dumps({k: v for k, v in meta.items() if not k.startswith("weights_")}))
        weights = folder / WEIGHTS[format]
        original = weights.read_bytes()
        bad = corrupted(original, data)
        weights.write_bytes(bad)
        model = load_or_refuse(folder, norm=format == "deltatune")
        if model is None:
            return
        assert variant != "deltatune" or bad == original, "a changed file passed the weights record"
        tensors = strict_read(bad)
        assert tensors is not None, "deltatune loaded a file that breaks the safetensors format"
        assert all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())
        torch.testing.assert_close(outputs(model), outputs(rebuilt_from(tensors, format)), rtol=0, atol=0)


# --- the saved files themselves, and what the fuzzers found -----------------------------------------------------
@pytest.mark.parametrize("format", sorted(CONFIG))
def test_the_unchanged_files_load_to_the_saved_outputs(templates, format):
    """The fuzzers' starting point (peft's own folder for peft) loads exactly: their oracle can tell."""
    model = load_or_refuse(templates[format][0], norm=format == "deltatune")
    assert model is not None
    torch.testing.assert_close(outputs(model), templates[format][1], rtol=0, atol=0)
    torch.testing.assert_close(peft_outputs(templates["peft"][0]), templates["peft"][1], rtol=1e-6, atol=1e-6)


# (format, field, value written into the config, fragments of the one-line refusal)
FOUND = [
    ("deltatune", "alpha", 1.7e38 * 4, ["alpha", "float32"]),      # finite in JSON, inf or a torch error in use
    ("deltatune", "alpha", 10**400, ["alpha", "float32"]),          # a raw OverflowError before
    ("peft", "lora_alpha", 1e39, ["lora_alpha", "float32"]),
    ("peft", "\nextra", True, ["'\\nextra'"]),                      # a field name that broke the line
    ("peft", "alpha_pattern", [], ["alpha_pattern=[]"]),            # peft crashes on it; was taken as empty
    ("peft", "arrow_config", [], ["arrow_config=[]"]),
    ("peft", "task_type", [], ["task_type=[]", "SEQ_CLS"]),
    ("peft", "task_type", "CAUSAL", ["task_type='CAUSAL'"]),
    ("peft", "eva_config", [], ["eva_config=[]"]),
]


@pytest.mark.parametrize("format, field, value, fragments", FOUND, ids=[f"{f}-{k}-{v!r:.12}" for f, k, v, _ in FOUND])
def test_values_the_fuzzers_found_are_refused_in_one_line(templates, tmp_path, format, field, value, fragments):
    folder = Path(shutil.copytree(templates[format][0], tmp_path / "adapter"))
    path = folder / CONFIG[format]
    config = json.loads(path.read_text())
    (config["config"] if format == "deltatune" else config)[field] = value
    path.write_text(json.dumps(config))
    model = base_model(norm=format == "deltatune")
    before = model_digest(model)
    with pytest.raises(DeltatuneError) as caught:
        dt.load_adapter(model, folder)
    assert_one_line_message(caught.value, *fragments)
    assert model_digest(model) == before


# --- broken folders through the CLI: exit 2, one line, inputs unchanged -----------------------------------------
def link_digest(root: Path) -> dict[str, str]:
    """tree_digest that also records modes and never follows links (a symlink loop is an input too)."""
    digest = {}
    for path in sorted([root, *root.rglob("*")]):
        relative, mode = str(path.relative_to(root)), oct(os.lstat(path).st_mode)
        if path.is_symlink():
            digest[relative] = f"link {os.readlink(path)}"
        elif path.is_dir():
            digest[relative] = f"<dir> {mode}"
        else:
            digest[relative] = f"{mode} {hashlib.sha256(path.read_bytes()).hexdigest()}"
    return digest


def run_in_process(capsys, *argv: str) -> subprocess.CompletedProcess:
    """`deltatune ARGV` through deltatune.cli.main in this process; an exception other than the ones main()
    turns into exit 2 propagates and fails the test."""
    from deltatune.cli import main

    capsys.readouterr()
    status = main(list(argv))
    captured = capsys.readouterr()
    return subprocess.CompletedProcess(argv, status, captured.out, captured.err)


def needs_permissions() -> None:
    if os.geteuid() == 0:
        pytest.skip("root reads files whatever their mode")


def replace_by_folder(path: Path) -> None:
    path.unlink()
    path.mkdir()
    (path / "inside.txt").write_text("not the file")


def replace_by_loop(path: Path) -> None:
    path.unlink() if path.is_file() else shutil.rmtree(path)
    path.symlink_to(path.name)


# case -> (how to break a saved deltatune adapter folder `a`, fragments of the message)
BROKEN_ADAPTERS = {
    "unreadable weights": (lambda a: (a / WEIGHTS["deltatune"]).chmod(0), ["cannot be read", "permission"]),
    "unreadable folder": (lambda a: a.chmod(0), ["permission"]),
    "weights file is a folder": (lambda a: replace_by_folder(a / WEIGHTS["deltatune"]), ["is a folder, not a file"]),
    "config file is a folder": (lambda a: replace_by_folder(a / CONFIG["deltatune"]), ["is a folder, not a file"]),
    "a file where the folder should be": (lambda a: (shutil.rmtree(a), a.write_text("notes")),
                                          ["is a file, not an adapter folder"]),
    "empty folder": (lambda a: (shutil.rmtree(a), a.mkdir()), ["has no deltatune_config.json"]),
    "folder is a symlink loop": (replace_by_loop, ["symbolic link loop"]),
    "weights file is a symlink loop": (lambda a: replace_by_loop(a / WEIGHTS["deltatune"]), ["symbolic link loop"]),
    "non-UTF-8 config": (lambda a: (a / CONFIG["deltatune"]).write_bytes(b'{"format": "delta\xff\xfetune"}'),
                         ["not valid JSON", "utf-8"]),
}


@pytest.mark.parametrize("command", ["inspect", "eval"])
@pytest.mark.parametrize("case", sorted(BROKEN_ADAPTERS))
def test_cli_on_a_broken_adapter_folder_exits_2_in_one_line(tmp_path, capsys, command, case):
    if "unreadable" in case:
        needs_permissions()
    adapter = tmp_path / "adapter"
    dt.save_adapter(saved_model("deltatune"), adapter)
    breaking, fragments = BROKEN_ADAPTERS[case]
    breaking(adapter)
    before = link_digest(tmp_path)
    try:
        if command == "eval":  # in-process (the task's model is built once per worker): main() as the CLI runs it
            result = run_in_process(capsys, "eval", str(adapter), "--task", "digits")
        else:
            result = run_cli(command, str(adapter), cwd=tmp_path)
        assert_one_line_error(result, str(adapter), *fragments)
        assert result.stdout == ""
    finally:
        adapter.chmod(0o755) if adapter.is_dir() and not adapter.is_symlink() else None
    assert link_digest(tmp_path) == before


def first_shard(model: Path) -> Path:
    return sorted(model.glob("*.safetensors"))[0]


# case -> (how to break the first fine-tuned model folder `m`, fragments of the message)
BROKEN_MODELS = {
    "unreadable shard": (lambda m: first_shard(m).chmod(0), ["cannot read", "permission"]),
    "shard is a folder": (lambda m: replace_by_folder(first_shard(m)), ["is a directory"]),
    "a file where the model folder should be": (lambda m: (shutil.rmtree(m), m.write_text("notes")),
                                                ["not a safetensors file"]),
    "empty model folder": (lambda m: (shutil.rmtree(m), m.mkdir()), ["has no *.safetensors files"]),
    "model folder is a symlink loop": (replace_by_loop, ["symbolic link loop"]),
    "shard is a symlink loop": (lambda m: replace_by_loop(first_shard(m)), ["symbolic links"]),
    "non-UTF-8 index": (lambda m: (m / "model.safetensors.index.json").write_bytes(b'{"weight_map": {"a": "\xff"}}'),
                        ["model.safetensors.index.json", "corrupt"]),
    "non-UTF-8 base config": (lambda m: (m.parent / "base" / "config.json").write_bytes(b'{"n_layer": "\xff"}'),
                              ["config.json", "utf-8"]),
}


@pytest.mark.parametrize("case", sorted(BROKEN_MODELS))
def test_merge_of_a_broken_model_folder_exits_2_in_one_line(tmp_path, case):
    import yaml

    from merging.tiny_checkpoints import make_models

    if "unreadable" in case:
        needs_permissions()
    base, dirs, _, _ = make_models(tmp_path / "inputs")
    (tmp_path / "merge.yml").write_text(yaml.safe_dump(
        {"merge_method": "task_arithmetic", "base_model": str(base),
         "models": [{"model": str(d), "parameters": {"weight": 0.5}} for d in dirs]}))
    breaking, fragments = BROKEN_MODELS[case]
    breaking(dirs[0])
    before = link_digest(tmp_path)
    out = tmp_path / "merged"
    result = run_cli("merge", str(tmp_path / "merge.yml"), "--out", str(out), "--no-progress", cwd=tmp_path)
    assert_one_line_error(result, *fragments)
    assert link_digest(tmp_path) == before and not out.exists()
