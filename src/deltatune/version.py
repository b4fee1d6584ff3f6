"""The installed deltatune's version, from its package metadata (pyproject.toml is the one place it is written).

Read from metadata rather than from the package root, so that modules beneath it (the file formats, which record
the version that wrote a file) need not import the whole package.
"""
from __future__ import annotations

from importlib import metadata

# What a source tree that was never installed reports (PEP 440: a local version below every release).
UNINSTALLED_VERSION = "0+unknown"


def package_version() -> str:
    try:
        return metadata.version("deltatune")
    except metadata.PackageNotFoundError:
        return UNINSTALLED_VERSION
