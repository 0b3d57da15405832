"""The cloud: vLLM serves the public corpus's side of every DRAGON answer.

The names below are imported on first use (vLLM takes seconds to import).

* ``cli``: ``dragon-cloud serve | index``; ``loader``: build a ``DragonCloud`` from names;
* ``backend``: ``DragonCloud``, public retrieval + prompt layout + the shared vLLM engine;
* ``server``: the aiohttp app; ``link``: the WebSocket end devices connect to;
  ``openai_api``: the shared OpenAI routes over ``DragonCloud``;
* ``engine``, ``group``, ``gang``, ``drafting``, ``mixing``, ``streaming``: vLLM stream groups;
* ``plugin``, ``vllm_compat``: the vLLM version gate and the protocol models per version;
* ``corpus/``: ``PublicIndex``, the public passages (``corpus_cli``: its command line);
* ``query_batcher``: many requests' queries embedded together;
* ``admission``, ``quota``, ``device_tokens``, ``lifetime``, ``health``, ``metrics``, ``profiling``,
  ``exposure``: serving a crowd of devices safely.
"""

from dragon_core.exports import lazy_exports, public_names

_HOMES = {  # each module, with the public names it holds
    "dragon_vllm.backend": ("DragonCloud",),
    "dragon_vllm.server": ("ServerConfig", "build_app"),
    "dragon_vllm.corpus": ("PublicIndex",),
}
__all__ = public_names(_HOMES)
__getattr__ = lazy_exports(__name__, _HOMES)
