"""The mode table: what each answer mode does on each side, in one place.

A request's mode decides a handful of independent things: whether the device connects at all,
what crosses the link (drafts, the cloud's tokens, the cloud's passage text, nothing), how deep
each side drafts ahead, how the aggregator decides a step, who may aggregate, whether the device
prefills at once, and how the device lays out its prompts. Every side reads them from ``MODES``
instead of comparing mode strings, so a new mode is one row here.

Answer modes (``AnswerOptions.mode``, ``dragon-edge ask --mode``, the SDK's ``mode=``):

* ``dragon``: DRAGON (speculative aggregation, Greedy Scheduling);
* ``vdrag``: token-wise synchronous aggregation; ``sw``: sequence-wise (DRDG/SW);
* ``cloud``: cloud-only. The cloud decodes alone over its public passages and streams its
  tokens; the device computes nothing unless the cloud is lost, when it finishes alone from
  the committed tokens (flagged degraded);
* ``text``: DRCG/Text. The cloud sends its public passages' text; the device prefills them next
  to its private ones and decodes alone. Only the query goes up;
* ``concat``: DRCG with one concatenated prompt (context aggregation): as ``text`` on the wire;
  the device puts its private and the public passages, best score first, into one prompt;
* ``concord``: CONCORD (docs/CONCORD.md). The device aggregates and commits every token; the
  cloud runs its streams on the committed prefix the device sends and publishes evidence about
  its mixture; the device waits for it while waiting pays (greedy decoding only);
* ``device``: device-only (the same as ``use_cloud=False``); never reaches the wire.

The wire carries six of them (``messages.Mode``): ``concat`` asks the cloud for what ``text``
does, and ``device`` runs the device's session alone, which ``dragon`` describes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, get_args

from dragon_core import messages as m
from dragon_core.errors import DragonError

AnswerMode = Literal["dragon", "vdrag", "sw", "cloud", "text", "concat", "concord", "device"]
ANSWER_MODES: tuple[str, ...] = get_args(AnswerMode)

# What crosses the link after the Open: both sides' drafts and the aggregator's targets; the
# cloud's committed tokens (cloud-only); the cloud's public passages, once (DRCG); the device's
# committed tokens up and the cloud's evidence down (CONCORD); nothing.
Crossing = Literal["drafts", "tokens", "passages", "evidence", "nothing"]
# How many undecided drafts a side may hold: the scheduler's window (one round trip's worth,
# capped by max_depth); one (token-wise synchronous); the whole answer (sequence-wise).
Depth = Literal["window", "one", "all"]
# The device's prompts: one per private passage; one per private or public passage; one
# concatenation of them all.
Prompts = Literal["per_passage", "with_public", "concatenated"]


class UnknownMode(DragonError, ValueError):
    code = "unknown_mode"


@dataclass(frozen=True)
class ModeRule:
    name: str
    wire: m.Mode  # the Open.mode this answer mode sends
    crosses: Crossing
    depth: Depth = "window"
    synchronous: bool = False  # the aggregator mixes both sides' distributions (no verification)
    sends_whole_sequence: bool = False  # a follower sends its drafts once it has drafted them all
    aggregator: m.Side | None = None  # pinned (no scheduling); None: chosen per request
    device_prefills: bool = True  # at once, in the background; False: only if the cloud is lost
    device_passages: bool = True  # the private passages take part in the answer
    prompts: Prompts = "per_passage"

    @property
    def uses_link(self) -> bool:
        return self.crosses != "nothing"

    @property
    def both_draft(self) -> bool:
        """Both sides draft and one verifies: the only modes that measure what the scheduler
        needs (acceptance rates and both sides' decode times)."""
        return self.crosses == "drafts"

    @property
    def cloud_streams(self) -> bool:
        """The cloud opens decode streams for the request (not for passage text alone)."""
        return self.crosses in ("drafts", "tokens", "evidence")

    @property
    def streams_tokens(self) -> bool:
        """The cloud decides every token alone and streams it (``Tokens`` frames)."""
        return self.crosses == "tokens"

    def depth_for(self, max_depth: int, max_tokens: int) -> int:
        """The deepest a side may draft ahead of the committed text."""
        return {"one": 1, "all": max_tokens}.get(self.depth, max(1, max_depth))


MODES: dict[str, ModeRule] = {rule.name: rule for rule in (
    ModeRule("dragon", "dragon", "drafts"),
    ModeRule("vdrag", "vdrag", "drafts", depth="one", synchronous=True),
    ModeRule("sw", "sw", "drafts", depth="all", sends_whole_sequence=True),
    ModeRule("cloud", "cloud", "tokens", aggregator="cloud", device_prefills=False, device_passages=False),
    ModeRule("text", "text", "passages", prompts="with_public"),
    ModeRule("concat", "text", "passages", prompts="concatenated"),
    ModeRule("concord", "concord", "evidence", depth="one", aggregator="device"),
    ModeRule("device", "dragon", "nothing"),
)}


def mode_rule(mode: str) -> ModeRule:
    """The rule of an answer or wire mode; ``UnknownMode`` names the choices."""
    if not isinstance(mode, str) or mode not in MODES:
        raise UnknownMode(f"unknown mode {mode!r}; choose one of: {' | '.join(ANSWER_MODES)}")
    return MODES[mode]


def wire_mode(mode: str) -> m.Mode:
    """The ``Open.mode`` for an answer mode."""
    return mode_rule(mode).wire
