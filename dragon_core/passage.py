"""A retrieved passage: what the device's store and the cloud's public index both return.

``score`` is ``R(d)`` of the shared score function (``dragon_core.retrieval``), so passages
from the two sides can be mixed in one softmax. Where a passage comes from is told by the
side that found it: the device by its ``source`` (a file path or a text source's name) and
``ordinal`` (its place in that source), the cloud by its document's ``title``.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Passage:
    id: int
    text: str
    score: float  # R(d) = scale * cosine(query, passage)
    source: str = ""  # the device: the file or text source it was cut from
    ordinal: int = 0  # the device: its place among its source's passages
    title: str = ""  # the cloud: its document's title
