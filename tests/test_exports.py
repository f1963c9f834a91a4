"""The package's public façade: what ``import uffdd`` offers, and nothing by accident."""

from __future__ import annotations

import importlib
import pkgutil
import types

import uffdd

PUBLIC = {
    "Client", "ClientError", "GuestRegion", "MemoryRegion",  # the client library
    "UffddError", "ConfigError", "ProtocolError",  # the errors a caller catches
    "__version__",
}


def test_the_facade_exports_exactly_the_public_names() -> None:
    assert set(uffdd.__all__) == PUBLIC
    assert len(uffdd.__all__) == len(PUBLIC)  # no name twice


def test_every_public_name_is_the_object_of_its_module() -> None:
    from uffdd import client, errors
    assert uffdd.Client is client.Client
    assert uffdd.ClientError is client.ClientError
    assert uffdd.GuestRegion is client.GuestRegion
    assert uffdd.MemoryRegion is client.MemoryRegion
    assert uffdd.UffddError is errors.UffddError
    assert uffdd.ConfigError is errors.ConfigError
    assert uffdd.ProtocolError is errors.ProtocolError
    assert isinstance(uffdd.__version__, str) and uffdd.__version__


def test_public_errors_share_one_base() -> None:
    """A caller catches every error uffdd raises on purpose with one except clause."""
    for name in ("ClientError", "ConfigError", "ProtocolError"):
        assert issubclass(getattr(uffdd, name), uffdd.UffddError), name


def test_star_import_gives_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from uffdd import *", namespace)
    assert {k for k in namespace if k != "__builtins__"} == PUBLIC


def _modules() -> list[types.ModuleType]:
    found = [uffdd]
    for info in pkgutil.walk_packages(uffdd.__path__, "uffdd."):
        if info.name == "uffdd.__main__":
            continue  # runs the CLI when imported
        found.append(importlib.import_module(info.name))
    return found


def test_no_module_exports_what_it_only_imported() -> None:
    """Every ``__all__`` names things defined for it, never a module it imports (``os``)."""
    wrong = []
    for module in _modules():
        for name in getattr(module, "__all__", ()):
            if not hasattr(module, name):
                wrong.append(f"{module.__name__}.{name}: not defined")
            elif isinstance(getattr(module, name), types.ModuleType):
                wrong.append(f"{module.__name__}.{name}: a module")
    assert wrong == []
