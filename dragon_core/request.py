"""One request's settings, declared once: ``RequestSpec``.

The device fills a spec from its answer options; the wire ``Open`` is the spec plus the request
id the link assigns (flat on the wire, so the protocol version stays); the cloud reads the spec
back out of the ``Open``; and each side's ``SessionConfig`` is the spec plus what only that side
knows (its EOS ids, vocabulary, scheduler tuning). Adding a setting is one field here: the
conversions go by field name, never field by field.

Three different "top-K"s, three names:

* ``sampling.top_k``: sampling truncation (OpenAI's ``top_k``), applied to the aggregated
  distribution when a token is drawn;
* ``dist_top_k``: wire compression, the ids of each side's mixture a ``Draft`` carries
  (0: full vectors, exact mode);
* ``logprobs_k`` (the cloud's ``--logprobs-k``, formerly ``--top-k``): log-probs read from vLLM
  per stream and step, an engine setting of the cloud, not of a request.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from dragon_core import messages as m
from dragon_core.modes import ModeRule, mode_rule


@dataclass(frozen=True, kw_only=True)
class RequestSpec:
    """What both sides must agree on for one request (all but its id)."""

    max_tokens: int
    seed: int
    sampling: m.Sampling = m.Sampling()
    mode: m.Mode = "dragon"  # a wire mode (``modes.wire_mode`` maps answer modes onto them)
    aggregator: m.Side = "device"  # who aggregates first
    scheduling: bool = True  # Greedy Scheduling may move the aggregator
    max_depth: int = 8  # cap of the draft window
    dist_top_k: int = 0  # wire compression of each side's mixture; 0: full vectors
    prior: m.SchedulerPrior | None = None  # estimates from earlier requests on this link
    query: str = ""  # the cloud retrieves with it (empty for a session that asks no cloud)
    k: int = 0  # public passages the cloud retrieves
    retrieval: bool = True
    concord_top_m: int = 1  # CONCORD: entries of the cloud's mixture its evidence lists per step
    # CONCORD: the device waits for the cloud's evidence while its waiting debt is <= this;
    # inf: every step (exact dense greedy), -inf: never (device-only). docs/CONCORD.md
    concord_debt_max: float = 4.0
    # iterative retrieval (issue 16): re-retrieve every this many generated tokens, the question
    # and the answer so far as the query; 0: once, before the first token (dragon_core.iterative)
    retrieve_every: int = 0

    @property
    def rule(self) -> ModeRule:
        return mode_rule(self.mode)

    @property
    def engine_temperature(self) -> float:
        return engine_temperature(self.sampling)

    def to_open(self, request_id: int) -> m.Open:
        return m.Open(request_id=request_id, **wire_settings(self))

    @classmethod
    def from_open(cls, msg: m.Open) -> "RequestSpec":
        return cls(**{name: getattr(msg, name) for name in SPEC_FIELDS})


SPEC_FIELDS: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(RequestSpec))


def spec_fields(spec: RequestSpec) -> dict:
    """The spec's own fields (a ``SessionConfig`` is a spec with more), by name."""
    return {name: getattr(spec, name) for name in SPEC_FIELDS}


def wire_settings(spec: RequestSpec) -> dict:
    """The spec's fields as its ``Open`` carries them. Settings the mode's cloud never reads go
    at their defaults, which the codec leaves off the end of the frame: CONCORD's cloud paces
    itself by ``max_depth`` and its aggregator is pinned, so the scheduler's prior (~46 bytes)
    and ``scheduling`` are of no use to it (the device keeps its own spec)."""
    fields = spec_fields(spec)
    if spec.rule.crosses == "evidence":
        fields.update(prior=None, scheduling=True)
    return fields


def engine_temperature(sampling: m.Sampling) -> float:
    """The temperature the engines' streams run at. Greedy decoding takes the argmax of the
    aggregated distribution, which temperature 1 keeps as the model gives it; sampling puts the
    temperature into every document's distribution, before the mixture (as the reference)."""
    return 1.0 if sampling.greedy else sampling.temperature
