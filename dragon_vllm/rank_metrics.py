"""Per-rank metrics of a data-parallel cloud (``RankedEngine.stats()["ranks"]``), labelled by rank.

Two hit rates, kept apart: ``dragon_rank_prefix_cache_hit_ratio`` is what vLLM reported
(``num_cached_tokens`` of the rank's streams over their prompt tokens, since start);
``dragon_rank_estimated_hit_ratio`` is the placement's own block accounting (``BlockLedger``),
what it expected the rank's cache to hold when it placed the requests.
"""

from __future__ import annotations

from typing import Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

RANK_GAUGES = {
    "alive": "1 while the rank serves, 0 once it is lost",
    "open_requests": "Requests pinned to the rank",
    "open_streams": "Document streams pinned to the rank (its load)",
    "queued_groups": "Requests waiting for the rank's admission",
    "hit_rate": ("prefix_cache_hit_ratio", "Prompt tokens the rank's vLLM served from its prefix cache, since start"),
    "estimated_hit_rate": ("estimated_hit_ratio", "Prompt blocks the placement estimated cached on the rank"),
}
RANK_COUNTERS = {
    "placed": "Requests placed on the rank",
    "placed_by_overlap": "Requests placed on the rank for the document blocks it held",
    "prompt_tokens": "Prompt tokens of the rank's streams",
    "cached_tokens": "Prompt tokens the rank's vLLM served from its prefix cache",
    "lost_requests": "Requests open on the rank when it was lost",
}


def rank_families(ranks: Iterable[dict] | None) -> Iterator:
    """Prometheus families ``dragon_rank_<name>{rank="i"}``; nothing for a single-engine cloud."""
    ranks = list(ranks or ())
    if not ranks:
        return
    for stat, spec in RANK_GAUGES.items():
        name, doc = spec if isinstance(spec, tuple) else (stat, spec)
        family = GaugeMetricFamily(f"dragon_rank_{name}", doc, labels=["rank"])
        for r in ranks:
            family.add_metric([str(r["rank"])], float(r.get(stat, 0)))
        yield family
    for stat, doc in RANK_COUNTERS.items():
        family = CounterMetricFamily(f"dragon_rank_{stat}", doc, labels=["rank"])
        for r in ranks:
            family.add_metric([str(r["rank"])], float(r.get(stat, 0)))
        yield family
