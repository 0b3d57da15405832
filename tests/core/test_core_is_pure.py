"""The import boundary of ``dragon_core``: protocol rules only (numpy, msgspec, pure stdlib).

Two checks, because either alone can be fooled: the source of every module is parsed and each
import compared with an allow-list (catches a lazy import inside a function that a test run
never reaches), and the whole package is imported in a fresh interpreter to see what it
really pulls in (catches a dependency that comes in through an allowed package).
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

CORE = Path(__file__).resolve().parents[2] / "dragon_core"

# Standard-library modules that compute and nothing else: no files, clocks, sockets, threads,
# event loops or processes.
PURE_STDLIB = {
    "__future__", "abc", "bisect", "collections", "dataclasses", "enum", "functools", "hashlib", "heapq",
    "hmac", "itertools", "math", "operator", "re", "string", "struct", "typing", "unicodedata",
}
ALLOWED = PURE_STDLIB | {"numpy", "msgspec", "dragon_core"}

# What a host library would bring in; none of it may arrive by importing dragon_core.
FORBIDDEN = {
    "asyncio", "socket", "selectors", "ssl", "subprocess", "threading", "multiprocessing", "concurrent",
    "sqlite3", "shutil", "tempfile", "mmap", "fcntl", "aiohttp", "torch", "vllm", "llama_cpp",
    "transformers", "sentence_transformers", "faiss", "dragon_host", "dragon_edge", "dragon_vllm",
    "dragon_http",
}


def _imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def test_every_core_module_imports_only_the_allow_list():
    files = sorted(CORE.rglob("*.py"))
    assert len(files) > 10
    outside = {str(p.relative_to(CORE.parent)): sorted(_imported_roots(p) - ALLOWED) for p in files}
    assert {f: mods for f, mods in outside.items() if mods} == {}


def test_the_ast_check_sees_lazy_imports(tmp_path: Path):
    """A function-level import counts as much as a top-level one."""
    p = tmp_path / "m.py"
    p.write_text("import math\n\ndef f():\n    import asyncio\n    from torch import nn\n")
    assert _imported_roots(p) - ALLOWED == {"asyncio", "torch"}


_PROBE = """
import importlib, json, pkgutil, sys
import msgspec, numpy
before = set(sys.modules)
import dragon_core
for info in pkgutil.walk_packages(dragon_core.__path__, "dragon_core."):
    importlib.import_module(info.name)
print(json.dumps(sorted({m.split(".")[0] for m in set(sys.modules) - before})))
"""


def test_importing_all_of_dragon_core_brings_in_no_host_library():
    out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                         cwd=CORE.parent)
    assert out.returncode == 0, out.stderr
    gained = set(json.loads(out.stdout))
    assert "dragon_core" in gained
    assert gained & FORBIDDEN == set()
