"""Method configs are exported from the registry: `deltatune.<ConfigName>` for every registered method, with no
line per method in deltatune/__init__.py."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import deltatune as dt
from contract.toy_deltas import TOYS, toy_methods  # noqa: F401  (the fixture)


def test_every_registered_config_is_an_attribute_listed_by_dir_and_in_all():
    names = dir(dt)
    for entry in dt.list_methods():
        name = entry.config_cls.__name__
        assert getattr(dt, name) is entry.config_cls
        assert name in names and name in dt.__all__


def test_from_import_and_star_import_reach_the_configs():
    from deltatune import LoRAConfig

    assert LoRAConfig is dt.method_entry("lora").config_cls
    namespace: dict = {}
    exec("from deltatune import *", namespace)
    assert all(namespace[entry.config_cls.__name__] is entry.config_cls for entry in dt.list_methods())


@pytest.mark.usefixtures("toy_methods")
def test_a_method_registered_later_is_exported_without_touching_the_package():
    for config_cls, _ in TOYS.values():
        assert getattr(dt, config_cls.__name__) is config_cls
        assert config_cls.__name__ in dir(dt)


def test_an_unregistered_name_is_an_attribute_error_and_toys_leave_no_trace():
    with pytest.raises(AttributeError, match="no attribute 'NoSuchConfig'"):
        dt.NoSuchConfig  # noqa: B018
    assert not any(name.startswith("Toy") for name in dir(dt))
    assert not hasattr(dt, "ToyAffineOutputConfig")


def test_the_package_root_names_no_method_module():
    """Adding a method is one file plus its test: the root imports no method file by name."""
    source = Path(importlib.util.find_spec("deltatune").origin).read_text()
    assert "deltatune.methods." not in source
