"""The cloud: public retrieval + prompt layout + the shared vLLM engine, for both front doors.

* ``open_request`` serves the device link (``dragon_vllm.link``): the cloud's half of DRAGON (and
  of cloud-only answers); ``public_passages`` the DRCG/Text baseline (passage text, no streams).
* ``answer_chat`` / ``answer_text`` serve the OpenAI-compatible API: cloud-side RAG with output
  aggregation over the top-k public passages, run as a *solo* cloud ``Session`` — the same code
  path as DRAGON without a device, so the two cannot drift apart.
"""

from __future__ import annotations

import time
import uuid
from typing import AsyncIterator, Sequence

from dragon_core import messages as m
from dragon_core import session as s
from dragon_core import validation as v
from dragon_core.aggregate import log_mass
from dragon_core.engine import Engine, side_dist
from dragon_core.errors import InvalidOptions
from dragon_core.handshake import Identity
from dragon_core.prompt import last_user_message, passage_prompts
from dragon_core.request import RequestSpec
from dragon_host.answer_stream import AnswerStream
from dragon_host.slow_group import slowed
from dragon_vllm.link import OpenedRequest
from dragon_vllm.query_batcher import QueryBatcher


class DragonCloud:
    def __init__(self, engine: Engine, tokenizer, identity: Identity, eos_ids: Sequence[int], index=None, *,
                 default_k: int = 2, max_model_len: int = 2048, metrics=None, emulate_decode_ms: float = 0.0,
                 speculative_retrieval: bool = True) -> None:
        self.engine, self.tokenizer, self.identity, self.index = engine, tokenizer, identity, index
        self.eos_ids = frozenset(eos_ids)
        self.default_k, self.max_model_len, self.metrics = default_k, max_model_len, metrics
        self.emulate_decode_ms = emulate_decode_ms  # experiments only: a slower cloud on the link
        self.speculative_retrieval = speculative_retrieval  # RaLMSpec at iterative retrieval's boundaries
        self._ids = 0
        self._retriever = QueryBatcher(index) if index is not None else None
        self._lookahead = _lookahead_retriever(index)  # TeleRAG's two steps, on a lookahead IVF index

    async def warm_up(self) -> float:
        """One retrieval and two decode steps before serving, so that the first user does not pay
        for lazy initialisation (the retriever's first encode, vLLM's first batches). Seconds spent."""
        t0 = time.perf_counter()
        passages = await self.retrieve("warm-up", 1)
        prompts, scores = passage_prompts(self.tokenizer, "warm-up", [p.text for p in passages],
                                          [p.score for p in passages])
        group = await self.engine.open_group(prompts, 1.0, scores, 2)
        try:
            first = await side_dist(group, scores, 0)
            await group.append([first.argmax()])
            await side_dist(group, scores, 0)
        finally:
            await group.close()
        return time.perf_counter() - t0

    # ------------------------------------------------------------------ retrieval
    async def retrieve(self, query: str, k: int):
        if self.index is None or k <= 0:
            return []
        if self._lookahead is None:
            return await self._retriever.search(query, k)
        # TeleRAG's lookahead: open (embed, coarse quantizer, start copying the probed clusters)
        # where the query is first known, search where the passages are first needed. For a
        # request on the link both are here, back to back: open_request calls this as the request
        # task's first step (the Open's query is known from that instant) and needs the passages
        # for the prompt layout right after, which nothing can precede (the admission ticket is
        # sized by the prompts, the prefill needs them, the device's own prefill runs anyway).
        # So one request's copy has nothing of its own to overlap; what overlaps is the batching:
        # queries arriving while a batch is searched are embedded and opened meanwhile, their
        # copies running beside that scan (lookahead_retriever). The opened query is released
        # however the block ends (cancelled with its request, the device gone, an error).
        async with self._lookahead.opened(query) as opened:
            return await self._lookahead.search(opened, k)

    # ------------------------------------------------------------------ device link
    async def open_request(self, req: m.Open) -> OpenedRequest:
        documents = self.documents_for(req)
        if documents is not None:  # iterative retrieval: its first retrieval fills RaLMSpec's cache too
            first = await documents.retrieve(())
            group = await documents.open(first)
            return OpenedRequest(group, list(first.scores), [_source_name(p) for p in first.payload], list(first.ids),
                                 documents)
        passages = await self.retrieve(req.query, req.k) if req.retrieval else []
        prompts, scores = passage_prompts(self.tokenizer, req.query, [p.text for p in passages],
                                          [p.score for p in passages])
        self._check_length(prompts, req.max_tokens)
        group = await self.engine.open_group(prompts, RequestSpec.from_open(req).engine_temperature, scores,
                                             req.max_tokens)
        return OpenedRequest(slowed(group, self.emulate_decode_ms), scores, [_source_name(p) for p in passages],
                             [p.id for p in passages])

    def documents_for(self, req: m.Open):
        """Iterative retrieval's documents for a request (None: it retrieves once): the public
        index again at each boundary, speculating from RaLMSpec's cache unless turned off."""
        if not (req.retrieve_every and req.retrieval and self.index is not None):
            return None
        from dragon_vllm.public_documents import PublicDocuments

        return PublicDocuments(self, req, speculate=self.speculative_retrieval)

    async def public_passages(self, req: m.Open) -> m.Opened:
        """DRCG/Text: the top-k public passages themselves (text + score), for the device to
        prefill; the cloud opens no streams for such a request."""
        passages = await self.retrieve(req.query, req.k) if req.retrieval else []
        return m.Opened(req.request_id, [_source_name(p) for p in passages], [p.text for p in passages],
                        [float(p.score) for p in passages])

    # ------------------------------------------------------------------ OpenAI API
    async def answer_chat(self, messages: list[dict], **opts) -> "CloudAnswer":
        query = last_user_message(messages)
        if opts.get("retrieval", True):
            passages = await self.retrieve(query, opts.get("k") or self.default_k)
            prompts, scores = passage_prompts(self.tokenizer, query, [p.text for p in passages],
                                              [p.score for p in passages])
        else:  # a plain model server: the whole conversation through the chat template
            passages = []
            text = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            prompts = [self.tokenizer.encode(text, add_special_tokens=False)]
            scores = [0.0]
        return await self._answer(prompts, scores, passages, **opts)

    async def answer_text(self, prompt: str, **opts) -> "CloudAnswer":
        passages = await self.retrieve(prompt, opts.get("k") or self.default_k) if opts.get("retrieval", True) else []
        if passages:
            prompts = [self.tokenizer.encode(p.text + "\n\n" + prompt) for p in passages]
            scores = [float(p.score) for p in passages]
        else:
            prompts, scores = [self.tokenizer.encode(prompt)], [0.0]
        return await self._answer(prompts, scores, passages, **opts)

    async def _answer(self, prompts, scores, passages, *, max_tokens: int, temperature: float | None,
                      top_p: float | None, top_k: int | None, seed: int | None, stop: list[str], **_) -> "CloudAnswer":
        # the shared rules again (the routes checked the raw JSON; this guards every other caller)
        v.check_request(max_tokens=max_tokens, max_tokens_cap=self.max_model_len, temperature=temperature,
                        top_p=top_p, top_k=top_k, seed=seed)
        self._check_length(prompts, max_tokens)
        greedy = v.temperature_is_greedy(temperature)
        sampling = m.Sampling(greedy=greedy, temperature=1.0 if greedy else float(temperature),
                              top_k=int(top_k or 0) if (top_k or 0) > 0 else 0, top_p=float(top_p or 1.0))
        self._ids += 1
        spec = RequestSpec(max_tokens=max_tokens, seed=seed if seed is not None else self._ids, sampling=sampling,
                           aggregator="cloud", scheduling=False)
        session = s.Session("cloud", s.SessionConfig.from_spec(spec, self._ids, self.eos_ids), log_mass(scores),
                            solo=True)
        group = await self.engine.open_group(prompts, spec.engine_temperature, scores, max_tokens)
        stream = AnswerStream(session, group, scores, _no_send, self.tokenizer, self.eos_ids, stop).start()
        return CloudAnswer(stream, [_source_name(p) for p in passages], sum(len(p) for p in prompts))

    def _check_length(self, prompts, max_tokens: int) -> None:
        longest = max(len(p) for p in prompts)
        if longest + max_tokens > self.max_model_len:
            raise InvalidOptions("max_tokens", f"prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds "
                                 f"the model's context of {self.max_model_len} tokens")


class CloudAnswer:
    """One running API answer (``dragon_http.answer.Answer``): an ``AnswerStream``'s text."""

    def __init__(self, stream: AnswerStream, sources: list[str], prompt_tokens: int) -> None:
        self.stream, self.session = stream, stream.session
        self.sources, self.prompt_tokens = sources, prompt_tokens
        self.created = int(time.time())
        self._uid = uuid.uuid4().hex[:16]
        self.finish_reason = "stop"
        self._t0 = time.monotonic()

    def id(self, prefix: str) -> str:
        return f"{prefix}-{self._uid}"

    async def deltas(self) -> AsyncIterator[str]:
        async for delta in self.stream.deltas():
            if delta.text:
                yield delta.text
        if not self.stream.stopped:
            finish = await self.stream.finish()
            self.finish_reason = "length" if finish.reason == "length" else "stop"
        await self.aclose()

    async def text(self) -> str:
        return "".join([d async for d in self.deltas()])

    def usage(self) -> dict:
        n = len(self.session.committed)
        return dict(prompt_tokens=self.prompt_tokens, completion_tokens=n, total_tokens=self.prompt_tokens + n)

    def stats(self) -> dict:
        return dict(sources=self.sources, streams=len(self.sources) or 1,
                    seconds=round(time.monotonic() - self._t0, 4))

    async def aclose(self) -> None:
        """Stop decoding (if still running) and free the streams; safe to call twice."""
        await self.stream.close("client closed")


def _lookahead_retriever(index):
    """The two-step retriever of an index loaded with ``lookahead=True``, else None."""
    if getattr(index, "lookahead", None) is None:
        return None
    from dragon_vllm.lookahead_retriever import LookaheadRetriever

    return LookaheadRetriever(index)


async def _no_send(msg: m.Message) -> None:  # a solo session has no peer
    return None


def _source_name(passage) -> str:
    title = getattr(passage, "title", None)
    return f"{title}#{passage.id}" if title else str(passage.id)
