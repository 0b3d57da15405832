"""The device: private documents, a local engine, and the link to the cloud.

    from dragon_edge import DragonClient
    client = DragonClient(cloud_url="http://127.0.0.1:8000", store="~/.dragon/store")

The names below are imported on first use, so ``import dragon_edge.store`` (or the CLI's
``--help``) does not pay for the SDK, aiohttp and openai.

* ``sdk``: ``DragonClient`` / ``AsyncDragonClient``, shaped like the OpenAI client;
* ``runtime``: ``EdgeRuntime``, one answer from retrieval to the last token;
* ``store/``: ``DocumentStore``, the private passages on disk;
* ``link``: the WebSocket client to the cloud; ``loader``: build a runtime from options;
* ``engines/``: llama.cpp and transformers stream groups; ``serve/``: ``dragon-edge serve``;
* ``cli``: ``dragon-edge``; ``baselines``: the non-DRAGON modes benchmarks compare against.
"""

from dragon_core.exports import lazy_exports, public_names

_HOMES = {  # each module, with the public names it holds
    "dragon_edge.sdk": ("DragonClient", "AsyncDragonClient"),
    "dragon_edge.runtime": ("EdgeRuntime",),
    "dragon_edge.store": ("DocumentStore",),
}
__all__ = public_names(_HOMES)
__getattr__ = lazy_exports(__name__, _HOMES)
