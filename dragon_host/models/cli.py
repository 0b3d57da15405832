"""``dragon-models`` (also ``python -m dragon_host.models``): list, prepare, path, fingerprint."""

from __future__ import annotations

import argparse
import json
import sys

from dragon_core.errors import ModelNotInstalled, UnknownModel
from dragon_host.models.convert import is_prepared, prepare
from dragon_host.models.fingerprint import fingerprints
from dragon_host.models.registry import MODELS, RETRIEVERS, get_model, get_retriever

def _cmd_list(_: argparse.Namespace) -> int:
    for spec in MODELS.values():
        state = "ready" if _safe(lambda: is_prepared(spec.name)) else "not prepared"
        print(f"{spec.name:18} model      {state:13} {spec.description}")
    for r in RETRIEVERS.values():
        state = "installed" if _safe(r.path) else "not installed"
        print(f"{r.name:18} retriever  {state:13} {r.description}")
    return 0


def _safe(fn) -> bool:
    try:
        return bool(fn())
    except ModelNotInstalled:
        return False


def _cmd_prepare(args: argparse.Namespace) -> int:
    for name in args.names or list(MODELS):
        prepare(name, force=args.force)
    return 0


def _cmd_path(args: argparse.Namespace) -> int:
    if args.name in RETRIEVERS:
        print(get_retriever(args.name).path())
        return 0
    spec = get_model(args.name)
    print(spec.gguf_path() if args.gguf else spec.hf_dir())
    return 0


def _cmd_fingerprint(args: argparse.Namespace) -> int:
    fp = fingerprints(args.name, source=args.source)
    print(json.dumps({"model": fp.model, "tokenizer": fp.tokenizer}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="dragon-models", description="Registry of the models DRAGON runs.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="registered models and whether they are ready").set_defaults(fn=_cmd_list)
    p = sub.add_parser("prepare", help="convert GGUF models to safetensors folders in $DRAGON_CACHE")
    p.add_argument("names", nargs="*", metavar="NAME", help="models to prepare (default: all)")
    p.add_argument("--force", action="store_true", help="convert again even if ready")
    p.set_defaults(fn=_cmd_prepare)
    p = sub.add_parser("path", help="print a model's converted folder (or its GGUF, or a retriever's folder)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--gguf", action="store_true", help="print the GGUF file instead")
    p.set_defaults(fn=_cmd_path)
    p = sub.add_parser("fingerprint", help="print the model and tokenizer fingerprints")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--source", choices=("gguf", "hf"), default="gguf")
    p.set_defaults(fn=_cmd_fingerprint)
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (ModelNotInstalled, UnknownModel) as e:
        print(f"dragon-models: {e}", file=sys.stderr)
        return 2
