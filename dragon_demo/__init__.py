"""The demo world, outside both sides' packages: the device package does not import the cloud.

* ``world``: the public corpus, the private notes, the question; ``build_demo_world`` builds
  the cloud's index and the device's store from them;
* ``procs``: ``start_cloud`` / ``wait_healthy`` / ``stop`` a ``dragon-cloud serve`` child
  process, ``free_port``;
* ``ask``: one question through the device SDK;
* ``__main__``: ``python -m dragon_demo`` (``make demo``).

Importing this package needs only the standard library (each side's package is imported when
its part of the world is built).
"""

from dragon_demo.ask import ask
from dragon_demo.procs import free_port, start_cloud, stop, wait_healthy
from dragon_demo.world import (PRIVATE_NOTES, PUBLIC_CORPUS, QUESTION, build_demo_world, build_private_store,
                               build_public_index)

__all__ = [
    "PUBLIC_CORPUS", "PRIVATE_NOTES", "QUESTION", "build_demo_world", "build_public_index", "build_private_store",
    "free_port", "start_cloud", "stop", "wait_healthy", "ask",
]

