"""Profile the API process's event loop when asked: ``DRAGON_PROFILE=FILE dragon-cloud serve ...``.

Under load the cloud's API process is one saturated thread (the event loop serving every link,
retrieval hand-off and gang reader), so the question "where does its time go" is answered by a
deterministic profile of that thread alone. cProfile roughly doubles the cost of Python calls,
so read the profile for shares, not for absolute times. The stats are written when the server
stops gracefully (SIGTERM / Ctrl-C); `python -m benchmarks.profile_summary FILE` reads them.
"""

from __future__ import annotations

import cProfile
import logging
import os
from contextlib import contextmanager
from typing import Iterator

log = logging.getLogger("dragon.cloud")

ENV = "DRAGON_PROFILE"


@contextmanager
def profiled_if_asked() -> Iterator[None]:
    """Profile the calling thread while the block runs, if ``$DRAGON_PROFILE`` names a file."""
    path = os.environ.get(ENV)
    if not path:
        yield
        return
    profile = cProfile.Profile()
    profile.enable()
    try:
        yield
    finally:
        profile.disable()
        profile.dump_stats(path)
        log.warning("event-loop profile written to %s", path)
