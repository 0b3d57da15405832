"""A package's public names, imported on first use (PEP 562's module ``__getattr__``).

``dragon_core``, ``dragon_edge`` and ``dragon_vllm`` each list their names with the module that
holds them, so that importing the package stays light (vLLM takes seconds, the SDK pulls in
aiohttp and openai) and ``from package import Name`` still works.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping


def lazy_exports(package: str, homes: Mapping[str, str]) -> Callable[[str], Any]:
    """The ``__getattr__`` for ``package``: ``homes`` maps each public name to its module."""

    def __getattr__(name: str) -> Any:
        if name not in homes:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # __import__ rather than importlib: dragon_core's import boundary allows no importlib
        return getattr(__import__(homes[name], fromlist=[name]), name)

    return __getattr__
