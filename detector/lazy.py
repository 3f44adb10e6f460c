"""Names a package exports without importing the modules behind them until first use (PEP 562).

Used by the packages whose configuration is plain Python but whose other names load torch
(``detector``, ``pipeline.data``, ``pipeline.training``), so that a process that only plans
(a sweep's driver) never loads it.
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, names: Mapping[str, str]) -> Callable[[str], Any]:
    """A module-level ``__getattr__`` for ``package``: ``names[name]`` is the submodule that
    defines ``name`` (or the submodule itself, when ``name`` is its name). The first access
    imports it and keeps the value on the package."""

    def __getattr__(name: str) -> Any:
        if name not in names:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module = importlib.import_module(f"{package}.{names[name]}")
        value = module if name == names[name] else getattr(module, name)
        setattr(sys.modules[package], name, value)
        return value

    return __getattr__
