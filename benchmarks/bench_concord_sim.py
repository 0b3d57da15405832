"""CONCORD's link bytes per token, frame by frame, in the deterministic simulator (issue 14's
"≤ 30 B/token" goal).

The protocol code is the real one (``dragon_core`` sessions, the real codec: every frame is
encoded, so its size is real); only the engines are fake (distributions that are a function of
the prefix, over SmolLM2's vocabulary of 49,152 ids) and so is time (the H200 testbed's shape by
default: the device 28 ms a step, the cloud 8 ms, RTT 100 and 300 ms with jitter = RTT/10 each
way). Pings are left out: they are the connection's, not a request's.

Per answer the real link also carries the request's ``Open`` (its query) and the cloud's
``Opened``; they are encoded here for a question of ``--query-chars`` characters and spread over
the answer's tokens in the "all in" column, as ``AnswerStats.bytes_*`` counts them.

Rows: CONCORD at the default debt and exact (``D_max = ∞``), and DRAGON with top-32 and full
distributions (device aggregates), the same worlds and link seeds. Each CONCORD run is checked
against dense greedy DRAGON at every consulted step.

    python -m benchmarks.bench_concord_sim [--tokens 20 64] [--runs 8] [--out concord_sim.json]
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import time
from pathlib import Path

import numpy as np

from dragon_core import codec
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core.aggregate import cross_side_weights
from dragon_core.dist import Dist
from dragon_core.request import RequestSpec
from dragon_core.speculative import VERIFY, step_rng, synchronous_target
from dragon_core.testing.netsim import LinkSpec, SideSpec, SimulatedPair

RESULTS = Path(__file__).parent / "results"
VOCAB = 49_152  # SmolLM2's: ids past 127 take 3 bytes in msgpack, as on the real link
CASES = {
    "concord": dict(mode="concord"),
    "concord-exact": dict(mode="concord", concord_debt_max=math.inf),
    "dragon-top32": dict(mode="dragon", dist_top_k=32),
    "dragon-full": dict(mode="dragon", dist_top_k=0),
}


def fake_side(side_id: int, world: int, disagreement: float, top_k: int = 0):
    """A peaked next-token law: three candidates well above a flat rest, each side's logits
    perturbed by its own noise (``disagreement``), so the sides' argmaxes sometimes differ."""
    def dist_fn(prefix: tuple[int, ...]) -> Dist:
        shared = np.random.default_rng([world, 7, *prefix])
        z = shared.normal(0.0, 1.0, VOCAB)
        z[shared.choice(VOCAB, 3, replace=False)] += (9.0, 8.0, 7.5)
        z += np.random.default_rng([world, side_id, *prefix]).normal(0.0, disagreement, VOCAB)
        return Dist.top_k(z, top_k) if top_k else Dist.full(z)

    return dist_fn


def dense_token(cfg: s.SessionConfig, dev: SideSpec, cloud: SideSpec, prefix: tuple[int, ...]) -> int:
    _, eta_cloud = cross_side_weights(dev.log_h, cloud.log_h)
    return synchronous_target(dev.dist_fn(prefix), cloud.dist_fn(prefix), eta_cloud, cfg.sampling,
                              step_rng(cfg.seed, VERIFY, len(prefix)))


def per_answer_bytes(query_chars: int, case: dict, tokens: int) -> tuple[int, int]:
    """The ``Open`` (up) and ``Opened`` (down) of one request, as the device and cloud send them
    (the Open from the request's spec, as the SDK builds it)."""
    spec = RequestSpec(query="q" * query_chars, k=2, max_tokens=tokens, seed=0, max_depth=8, scheduling=False,
                       **case)
    return len(codec.encode(spec.to_open(1))), len(codec.encode(m.Opened(1, ["public:12", "public:873"])))


def one_run(case: dict, tokens: int, world: int, rtt_ms: float, dev_ms: float, cloud_ms: float,
            disagreement: float) -> dict:
    cfg = s.SessionConfig(request_id=1, max_tokens=tokens, seed=world, eos_ids=frozenset(), vocab_size=VOCAB,
                          max_depth=8, scheduling=False, **case)
    top_k = case.get("dist_top_k", 0)  # the engines hand out what the request's dist_top_k asks for
    dev = SideSpec(0.3, fake_side(1, world, disagreement, top_k), lambda now, step: dev_ms)
    cloud = SideSpec(1.1, fake_side(2, world, disagreement, top_k), lambda now, step: cloud_ms)
    one_way = rtt_ms / 2
    pair = SimulatedPair(cfg, dev, cloud, LinkSpec(one_way, one_way / 5, seed=world),
                         LinkSpec(one_way, one_way / 5, seed=world + 1000)).run()
    got = pair.device.record.tokens
    stats = pair.device.session.stats
    if case["mode"] == "concord":  # every consulted step commits dense greedy DRAGON's token
        kinds = stats.concord_by_step
        wrong = [t for t in range(len(got)) if kinds[t] != "local" and got[t] != dense_token(cfg, dev, cloud, tuple(got[:t]))]
        assert not wrong, f"consulted steps {wrong} differ from dense greedy"
    kinds_bytes: collections.Counter = collections.Counter()
    for direction, link in (("up", pair.up), ("down", pair.down)):
        for frame in link.frames:
            name = type(codec.decode(frame)).__name__
            if name not in ("Ping", "Pong"):
                kinds_bytes[f"{direction} {name}"] += len(frame)
    return dict(tokens=len(got), finish_ms=pair.device.record.finish_ms, bytes=dict(kinds_bytes),
                steps={k: getattr(stats, f"steps_{k}", 0) for k in ("certified", "local", "dense", "supplemented")},
                evidence_missed=getattr(stats, "evidence_missed", 0))


def run(tokens_list: list[int], rtts: list[float], runs: int, dev_ms: float, cloud_ms: float,
        disagreement: float, query_chars: int) -> dict:
    table: dict = {}
    for tokens in tokens_list:
        for rtt in rtts:
            row = table.setdefault(f"{tokens} tokens, RTT {rtt:.0f}", {})
            for name, case in CASES.items():
                rs = [one_run(case, tokens, w, rtt, dev_ms, cloud_ms, disagreement) for w in range(runs)]
                n = sum(r["tokens"] for r in rs)
                kinds: collections.Counter = collections.Counter()
                for r in rs:
                    kinds.update(r["bytes"])
                up_open, down_opened = per_answer_bytes(query_chars, case, tokens)
                step_up = sum(v for k, v in kinds.items() if k.startswith("up")) / n
                step_down = sum(v for k, v in kinds.items() if k.startswith("down")) / n
                fixed = (up_open + down_opened) * runs / n
                row[name] = dict(
                    tokens_per_answer=n / runs, per_step_bytes_per_token=step_up + step_down,
                    up_per_token=step_up, down_per_token=step_down, open_opened_per_answer=up_open + down_opened,
                    all_in_bytes_per_token=step_up + step_down + fixed,
                    by_frame={k: round(v / n, 2) for k, v in sorted(kinds.items())},
                    ms_per_token=float(np.mean([r["finish_ms"] / r["tokens"] for r in rs])),
                    steps={k: sum(r["steps"][k] for r in rs) / n for k in rs[0]["steps"]},
                    evidence_missed_per_token=sum(r["evidence_missed"] for r in rs) / n)
            dense = row["dragon-top32"]
            for name in ("concord", "concord-exact"):
                c = row[name]
                c["bytes_vs_top32"] = c["all_in_bytes_per_token"] / dense["all_in_bytes_per_token"]
                c["bytes_vs_full"] = c["all_in_bytes_per_token"] / row["dragon-full"]["all_in_bytes_per_token"]
                c["speed_vs_top32"] = dense["ms_per_token"] / c["ms_per_token"]
    return dict(table=table)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = list(result["table"])
    fig, ax = plt.subplots(figsize=(10, 4.5))
    width = 0.8 / 3
    for i, name in enumerate(("concord", "concord-exact", "dragon-top32")):
        vals = [result["table"][r][name]["all_in_bytes_per_token"] for r in rows]
        bars = ax.bar(np.arange(len(rows)) + (i - 1) * width, vals, width, label=name)
        ax.bar_label(bars, fmt="%.0f", fontsize=7)
    ax.axhline(30, color="k", ls="--", lw=1, label="goal: 30 B/token")
    ax.set_xticks(np.arange(len(rows)), rows, fontsize=8)
    ax.set_ylabel("link bytes per token (all in, pings out)")
    ax.set_yscale("log")
    ax.set_title("CONCORD's bytes in the simulator (real frames, fake engines, H200-testbed timing)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: list[str] | None = None) -> dict:
    from benchmarks.environment import describe

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, nargs="+", default=[20, 64], help="answer lengths (default: 20 64)")
    ap.add_argument("--rtt-ms", type=float, nargs="+", default=[100.0, 300.0])
    ap.add_argument("--runs", type=int, default=8, help="worlds per cell (default: 8)")
    ap.add_argument("--device-ms", type=float, default=28.0, help="device step (the H200 testbed's llama.cpp: 28)")
    ap.add_argument("--cloud-ms", type=float, default=8.0, help="cloud step (default: 8)")
    ap.add_argument("--disagreement", type=float, default=0.7, help="std of each side's own logit noise")
    ap.add_argument("--query-chars", type=int, default=48, help="question length for the Open frame (NQ: ~48)")
    ap.add_argument("--out", default="concord_sim.json", help="file name under benchmarks/results/")
    args = ap.parse_args(argv)
    t0 = time.time()
    result = run(args.tokens, args.rtt_ms, args.runs, args.device_ms, args.cloud_ms, args.disagreement,
                 args.query_chars)
    result.update(benchmark="bench_concord_sim", setup=vars(args), seconds=round(time.time() - t0, 1),
                  environment=describe(["numpy", "msgspec"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / args.out
    out.write_text(json.dumps(result, indent=1))
    plot(result, out.with_suffix(".png"))
    print(f"{'cell':24s} {'mode':14s} {'B/token all in':>14s} {'per step':>9s} {'ms/token':>9s}  frames (B/token)")
    for cell, row in result["table"].items():
        for name, r in row.items():
            print(f"{cell:24s} {name:14s} {r['all_in_bytes_per_token']:14.1f} {r['per_step_bytes_per_token']:9.1f} "
                  f"{r['ms_per_token']:9.1f}  {r['by_frame'] if name.startswith('concord') else ''} "
                  f"{'missed %.2f/token' % r['evidence_missed_per_token'] if name.startswith('concord') else ''}")
    print(f"(simulated in {result['seconds']} s; {out})")
    return result


if __name__ == "__main__":
    main()
