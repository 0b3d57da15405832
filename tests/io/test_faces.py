"""The packages' faces: each ``__init__`` says what it offers (``__all__``), the names resolve,
importing a package stays light, and the device package does not import the cloud's."""

from __future__ import annotations

import ast
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("dragon_core", "dragon_host", "dragon_http", "dragon_edge", "dragon_vllm", "dragon_demo")


def _inits() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (ROOT / pkg).rglob("__init__.py"))


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def _module_file(module: str) -> Path:
    base = ROOT.joinpath(*module.split("."))
    return base / "__init__.py" if base.is_dir() else base.with_suffix(".py")


def _literal(init: Path, name: str):
    """The value assigned to ``name`` at the top of ``init``; ``public_names(_HOMES)`` (a lazy
    face) is read as the names ``_HOMES`` lists."""
    for node in ast.parse(init.read_text()).body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == name for t in node.targets):
            if isinstance(node.value, ast.Call) and ast.unparse(node.value) == "public_names(_HOMES)":
                return list(_homes(init))
            return ast.literal_eval(node.value)
    return None


def _homes(init: Path) -> dict[str, str]:
    """A lazy face's ``_HOMES`` (module -> its public names) as name -> module."""
    return {name: module for module, names in (_literal(init, "_HOMES") or {}).items() for name in names}


def test_every_package_init_has_an_all():
    missing = [str(p.relative_to(ROOT)) for p in _inits() if _literal(p, "__all__") is None]
    assert missing == []


def test_every_exported_name_resolves_without_importing_engines():
    """Checked on the source, so dragon_vllm's names are checked without importing vLLM. A name
    is defined in the ``__init__``, is a submodule, or (lazy faces) is defined where ``_HOMES``
    says it lives."""
    unresolved = []
    for init in _inits():
        package = ".".join(init.relative_to(ROOT).parent.parts)
        homes = _homes(init)
        for name in _literal(init, "__all__") or []:
            if name in homes:
                ok = name in _top_level_names(_module_file(homes[name]))
            else:
                ok = name in _top_level_names(init) or importlib.util.find_spec(f"{package}.{name}") is not None
            if not ok:
                unresolved.append(f"{package}.{name}")
    assert unresolved == []


def test_the_sdk_is_the_device_packages_face():
    from dragon_edge import AsyncDragonClient, DragonClient
    from dragon_edge import sdk

    assert DragonClient is sdk.DragonClient and AsyncDragonClient is sdk.AsyncDragonClient


def test_no_device_module_imports_the_cloud():
    offenders = []
    for path in sorted((ROOT / "dragon_edge").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            mods = ([a.name for a in node.names] if isinstance(node, ast.Import)
                    else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            offenders += [f"{path.relative_to(ROOT)}: {m}" for m in mods if m.split(".")[0] == "dragon_vllm"]
    assert offenders == []


_PROBE = "import sys, json, {pkg}; print(json.dumps(sorted({{m.split('.')[0] for m in sys.modules}})))"


def _roots_after_import(pkg: str) -> set[str]:
    out = subprocess.run([sys.executable, "-c", _PROBE.format(pkg=pkg)], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    return set(json.loads(out.stdout))


def test_importing_a_package_stays_light():
    heavy = {"torch", "vllm", "llama_cpp", "transformers", "openai", "aiohttp", "faiss"}
    for pkg in ("dragon_core", "dragon_edge", "dragon_vllm", "dragon_demo"):
        assert _roots_after_import(pkg) & (heavy | {"dragon_vllm"} - {pkg}) == set(), pkg
