"""This side's handshake identity, read from its model files and its retriever's files."""

from __future__ import annotations

from dragon_core.handshake import Identity
from dragon_core.retrieval import score_function_id
from dragon_host.embedder import retriever_fingerprint
from dragon_host.models.fingerprint import fingerprints


def local_identity(model: str, source: str = "gguf") -> Identity:
    """This side's identity from the model registry and the retriever contract.

    ``source`` says which copy of the weights this side runs ("gguf" on the device, "hf" on
    the cloud); the fingerprints are equal when one is the conversion of the other.
    """
    fp = fingerprints(model, source)  # type: ignore[arg-type]
    return Identity(model, fp.model, fp.tokenizer, retriever_fingerprint(), score_function_id())
