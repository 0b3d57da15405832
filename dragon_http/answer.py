"""What the OpenAI routes need from a runtime: the *answer backend* protocol.

Two runtimes implement it: the cloud's ``DragonCloud`` (cloud-side RAG over the public index,
vLLM) and the device's ``EdgeRuntime`` (a DRAGON answer over the private store, with the cloud
when there is one). The routes validate the request, call ``answer_chat`` / ``answer_text`` with
the options below, and turn the ``Answer`` into OpenAI's JSON or server-sent events.

Options every backend receives (already validated): ``max_tokens`` (int), ``temperature``,
``top_p``, ``top_k`` (None = the default; ``temperature`` 0 or None = greedy), ``seed`` and
``stop`` (a list of strings, maybe empty: the backend's answer stream ends the answer before the
first, with hold-back, and sets ``finish_reason`` "stop"), plus the fields its ``RequestExtras``
adds (``dragon_http.request``).
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Protocol


class Answer(Protocol):
    """One running answer."""

    created: int  # unix seconds, for OpenAI's ``created``
    finish_reason: str  # "stop" (EOS or a stop string) or "length"

    def id(self, prefix: str) -> str:
        """OpenAI's response id with this prefix (``chatcmpl``, ``cmpl``)."""
        ...

    def deltas(self) -> AsyncIterator[str]:
        """The answer's text, in pieces, as tokens commit."""
        ...

    def usage(self) -> dict:
        """``{"prompt_tokens", "completion_tokens", "total_tokens"}``."""
        ...

    def stats(self) -> dict:
        """DRAGON's extra field ``dragon`` of the last chunk / the response body."""
        ...

    async def aclose(self) -> None:
        """Stop decoding if it still runs and free its resources; safe to call twice."""
        ...


class AnswerBackend(Protocol):
    max_model_len: int  # the context, in tokens: bounds prompt + max_tokens

    async def answer_chat(self, messages: list[dict], **opts: Any) -> Answer:
        """An answer to a (validated) OpenAI conversation."""
        ...

    async def answer_text(self, prompt: str, **opts: Any) -> Answer:
        """An answer to a (validated) completion prompt."""
        ...

# A backend may also have ``tokenizer`` (a Hugging Face tokenizer): the routes then refuse a
# prompt that cannot fit ``max_model_len`` with a 400, tokenised off the event loop.
