"""Host I/O shared by the device (``dragon_edge``) and the cloud (``dragon_vllm``).

``dragon_core`` holds the protocol's rules and touches no files, clocks or event loops; what
both sides do with the host itself lives here, written once:

* ``driver``: ``SessionDriver``, the asyncio adapter that runs one ``Session`` on one engine;
* ``models/``: the model registry, GGUF header, fingerprints, conversion and ``dragon-models``;
* ``embedder``: the retriever's files, their fingerprint, and the embedding model itself;
* ``identity``: this side's handshake ``Identity`` read from those files;
* ``files``: hash a file, fsync a path, install a finished file or folder atomically;
* ``errors``: the errors of a passage index on disk (the device's store, the cloud's corpus).

Only ``files`` and ``errors`` are imported here: the driver brings asyncio and the embedder
numpy, and a caller that needs neither should not pay for them.
"""

from dragon_host.errors import IndexCorrupt, IndexNotFound, PassageIndexError, RetrieverMismatch
from dragon_host.files import file_sha256, fsync_path, install

__all__ = [
    "file_sha256", "fsync_path", "install",
    "PassageIndexError", "IndexNotFound", "IndexCorrupt", "RetrieverMismatch",
]
