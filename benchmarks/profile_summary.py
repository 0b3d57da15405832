"""Summarise a cProfile file of the cloud's event loop (``DRAGON_PROFILE``): the functions with
the most own time, and own time grouped by package, as JSON.

    python -m benchmarks.profile_summary cloud.prof --out benchmarks/results/cloud_profile.json
"""

from __future__ import annotations

import argparse
import json
import pstats
from collections import defaultdict
from pathlib import Path

# Package groups, matched in order against a function's file path.
GROUPS = ("dragon_core", "dragon_vllm", "dragon_http", "dragon_edge", "vllm", "aiohttp", "msgspec", "numpy",
          "torch", "faiss", "transformers", "tokenizers", "asyncio", "selectors", "json", "zmq")


def group_of(filename: str) -> str:
    if filename.startswith("~") or filename.startswith("<"):
        return "builtins"
    for name in GROUPS:
        if f"/{name}/" in filename or filename.endswith(f"/{name}.py"):
            return name
    return "other"


def summarise(path: Path, top: int = 40) -> dict:
    stats = pstats.Stats(str(path))
    rows, by_group = [], defaultdict(float)
    total = 0.0
    for (filename, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.stats.items():
        total += tottime
        by_group[group_of(filename)] += tottime
        rows.append(dict(function=f"{Path(filename).name}:{line}({func})", group=group_of(filename),
                         calls=ncalls, own_s=round(tottime, 3), cumulative_s=round(cumtime, 3)))
    rows.sort(key=lambda r: -r["own_s"])
    by_cum = sorted(rows, key=lambda r: -r["cumulative_s"])[:top]
    return dict(profile=str(path), total_own_s=round(total, 3),
                own_share_by_group={g: round(t / total, 4) for g, t in sorted(by_group.items(), key=lambda x: -x[1])},
                top_own=rows[:top], top_cumulative=by_cum)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("profile", type=Path, help="a file written under DRAGON_PROFILE")
    ap.add_argument("--top", type=int, default=40, help="functions listed (default 40)")
    ap.add_argument("--out", type=Path, help="write the JSON here (default: stdout)")
    args = ap.parse_args(argv)
    result = summarise(args.profile, args.top)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
        print(json.dumps(result["own_share_by_group"]))
    else:
        print(text)


if __name__ == "__main__":
    main()
