"""Host I/O shared by the device (``dragon_edge``) and the cloud (``dragon_vllm``).

``dragon_core`` holds the protocol's rules and touches no files, clocks or event loops; what
both sides do with the host itself lives here, written once:

* ``files``: hash a file, fsync a path, install a finished file or folder atomically;
* ``errors``: the errors of a passage index on disk (the device's store, the cloud's corpus).
"""

from dragon_host.errors import IndexCorrupt, IndexNotFound, PassageIndexError, RetrieverMismatch
from dragon_host.files import file_sha256, fsync_path, install

__all__ = [
    "file_sha256", "fsync_path", "install",
    "PassageIndexError", "IndexNotFound", "IndexCorrupt", "RetrieverMismatch",
]
