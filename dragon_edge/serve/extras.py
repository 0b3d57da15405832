"""The device's DRAGON request fields, as the SDK takes them (``create(..., mode="vdrag", k=3)``).

With the ``openai`` package they go in ``extra_body``; in JSON they sit next to OpenAI's own
fields. Each is an ``AnswerOptions`` field and is checked by its rules
(``runtime.check_answer_options``), before any work: a bad one is a 400 naming it.
"""

from __future__ import annotations

from typing import Any

from dragon_core import validation as v
from dragon_core.errors import InvalidOptions
from dragon_core.modes import UnknownMode
from dragon_edge.runtime import AnswerOptions, check_answer_options

# top_k, temperature, top_p, seed and max_tokens come from OpenAI's fields; emulate_decode_ms
# and cloud_open_timeout_s are experiment knobs, not for apps.
FIELDS = ("k", "cloud_k", "mode", "aggregator", "scheduling", "max_depth", "dist_top_k", "use_cloud",
          "concord_debt_max", "concord_top_m", "retrieve_every")


class EdgeExtras:
    names = frozenset(FIELDS)

    def check(self, p: dict) -> None:
        opts = AnswerOptions(**self.options(p))
        t = p.get("temperature")  # checked by the OpenAI rules; here only as CONCORD reads it (greedy only)
        if opts.mode == "concord" and isinstance(t, (int, float)) and not isinstance(t, bool) \
                and not v.temperature_is_greedy(t):
            opts.greedy, opts.temperature = False, float(t)
        try:
            check_answer_options(opts)
        except UnknownMode as exc:
            raise InvalidOptions("mode", str(exc)) from None

    def options(self, p: dict) -> dict[str, Any]:
        return {name: p[name] for name in FIELDS if p.get(name) is not None}
