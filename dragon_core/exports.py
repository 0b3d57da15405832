"""A package's public names, imported on first use (PEP 562's module ``__getattr__``).

``dragon_core``, ``dragon_edge`` and ``dragon_vllm`` each list their names with the module that
holds them, so that importing the package stays light (vLLM takes seconds, the SDK pulls in
aiohttp and openai) and ``from package import Name`` still works.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

Homes = Mapping[str, Sequence[str]]  # each module, with the public names it holds


def public_names(homes: Homes) -> list[str]:
    """The package's ``__all__``: every name ``homes`` lists, in order."""
    return [name for names in homes.values() for name in names]


def lazy_exports(package: str, homes: Homes) -> Callable[[str], Any]:
    """The ``__getattr__`` for ``package``: a public name's module is imported when the name is
    first used."""
    module_of = {name: module for module, names in homes.items() for name in names}

    def __getattr__(name: str) -> Any:
        if name not in module_of:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        # __import__ rather than importlib: dragon_core's import boundary allows no importlib
        return getattr(__import__(module_of[name], fromlist=[name]), name)

    return __getattr__
