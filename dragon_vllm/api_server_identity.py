"""Which of the N API server processes answered (``dragon-cloud serve --api-servers N``).

Every response of process ``i`` (the device link's WebSocket upgrade, ``/health``, the OpenAI
routes) carries ``X-Dragon-Api-Server: i``, and every series of its ``/metrics`` the label
``api_server="i"``: an operator (and the test) can tell which process served a connection.

Each process answers ``/health`` and ``/metrics`` for itself only. A scrape through the shared
port reaches ONE process, whichever the kernel's SO_REUSEPORT hash picks for that connection, so
one scrape is not the whole server: scrape repeatedly (the label keeps the processes' series
apart; a counter that seems to reset is another process) or sum per ``api_server`` over time.
prometheus_client's multiprocess mode (what vLLM's ``setup_multiprocess_prometheus`` uses) was
not taken: the engine and retrieval collectors here read live objects at scrape time, which that
mode cannot aggregate across processes. This is weaker than one aggregated view; documented in
the README's Limitations.
"""

from __future__ import annotations

from typing import Iterator

from aiohttp import web
from prometheus_client.metrics_core import Metric

HEADER = "X-Dragon-Api-Server"
LABEL = "api_server"


class LabelledRegistry:
    """A registry's metrics with one more label on every sample (``generate_latest`` takes any
    object with ``collect``)."""

    def __init__(self, registry, label: str, value: str) -> None:
        self._registry, self._label, self._value = registry, label, value

    def collect(self) -> Iterator[Metric]:
        for family in self._registry.collect():
            labelled = Metric(family.name, family.documentation, family.type, family.unit)
            labelled.samples = [s._replace(labels={self._label: self._value, **s.labels}) for s in family.samples]
            yield labelled


def identify(app: web.Application, metrics, index: int) -> None:
    """Mark process ``index``'s responses and metrics."""
    value = str(index)

    async def add_header(request: web.Request, response: web.StreamResponse) -> None:
        response.headers[HEADER] = value

    app.on_response_prepare.append(add_header)  # also runs for the WebSocket upgrade's 101
    metrics.exposed = LabelledRegistry(metrics.registry, LABEL, value)
