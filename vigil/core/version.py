"""This installation's version: the package metadata's, or `0+unknown` for a source tree
that was never installed."""

from __future__ import annotations

from importlib import metadata

try:
    VERSION = metadata.version("vigil")
except metadata.PackageNotFoundError:
    VERSION = "0+unknown"
