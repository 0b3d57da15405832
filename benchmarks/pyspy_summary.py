"""Summarise a py-spy sampling profile (``py-spy record --format raw --subprocesses``) per process:
where each process of a run spends its CPU, by package and by function, as JSON.

Why a sampler next to ``profile_summary.py`` (cProfile of the API loop): the cloud's time is spread
over processes (the API process, vLLM's engine core, device replayers), and the engine core's
Python scheduler, model runner and logits processor cannot be reached from the API process.
py-spy samples every process of the run at a fixed rate without changing its speed much.

    py-spy record --subprocesses --format raw --rate 100 -o run.txt -- python -m benchmarks.bench_vllm_streams ...
    python -m benchmarks.pyspy_summary run.txt --out benchmarks/results/profile_gang_h200.json
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter, defaultdict
from pathlib import Path

from benchmarks.profile_summary import GROUPS

_PROCESS = re.compile(r'^process (\d+):"(.*)"$')
_FRAME = re.compile(r"^(?P<func>.*) \((?P<file>[^:()]*)(?::\d+)?\)$")


def package_of(filename: str) -> str:
    for name in GROUPS:
        if f"{name}/" in filename or filename.startswith(name):
            return name
    return "other"


def parse(lines) -> dict[str, list[tuple[list[str], int]]]:
    """Stacks per process, keyed by the innermost ``process PID:"cmdline"`` frame."""
    by_process: dict[str, list[tuple[list[str], int]]] = defaultdict(list)
    for line in lines:
        stack, _, count = line.rstrip("\n").rpartition(" ")
        if not stack or not count.isdigit():
            continue
        frames = stack.split(";")
        key, first = "?", 0
        for i, frame in enumerate(frames):
            if m := _PROCESS.match(frame):
                key, first = f"{m.group(1)} {m.group(2)[:120]}", i + 1
        by_process[key].append((frames[first:], int(count)))
    return by_process


def summarise_process(stacks: list[tuple[list[str], int]], top: int) -> dict:
    total = sum(n for _, n in stacks)
    own: Counter = Counter()
    inclusive: Counter = Counter()
    packages: Counter = Counter()
    for frames, n in stacks:
        if not frames:
            continue
        leaf = frames[-1]
        own[leaf] += n
        m = _FRAME.match(leaf)
        packages[package_of(m.group("file")) if m else "other"] += n
        for frame in set(frames):  # a recursive frame counts once per sample
            inclusive[frame] += n
    share = lambda n: round(n / total, 4) if total else 0.0  # noqa: E731
    return {"samples": total,
            "own_by_package": {k: share(v) for k, v in packages.most_common()},
            "own_top": [[f, share(n)] for f, n in own.most_common(top)],
            "inclusive_top": [[f, share(n)] for f, n in inclusive.most_common(top)]}


def keep(frames: list[str], within: list[str], without: list[str]) -> bool:
    """A sample of the phase asked for: some frame names one of ``within`` (e.g. the engine core's
    ``run_busy_loop``, leaving out its start-up) and none names one of ``without``."""
    inside = not within or any(w in f for f in frames for w in within)
    return inside and not any(w in f for f in frames for w in without)


def summarise(path: Path, top: int = 40, min_samples: int = 20, within: list[str] = (),
              without: list[str] = ()) -> dict:
    with open(path) as f:
        by_process = parse(f)
    processes = {key: summarise_process([(fr, n) for fr, n in stacks if keep(fr, within, without)], top)
                 for key, stacks in by_process.items()}
    busy = {k: v for k, v in processes.items() if v["samples"] >= min_samples}
    return {"profile": str(path), "within": list(within), "without": list(without), "processes": dict(sorted(busy.items(), key=lambda kv: -kv[1]["samples"]))}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("raw", type=Path, help="py-spy --format raw output")
    ap.add_argument("--top", type=int, default=40, help="functions listed per process")
    ap.add_argument("--within", nargs="*", default=[], help="keep samples with a frame naming one of these")
    ap.add_argument("--without", nargs="*", default=[], help="drop samples with a frame naming one of these")
    ap.add_argument("--out", type=Path, help="JSON file (default: print)")
    args = ap.parse_args(argv)
    result = summarise(args.raw, args.top, within=args.within, without=args.without)
    text = json.dumps(result, indent=1)
    if args.out:
        args.out.write_text(text + "\n")
    else:
        print(text)


if __name__ == "__main__":
    main()
