"""``dragon-cloud serve --api-servers 2``: two API server processes on one vLLM engine core
(dragon_vllm/api_servers.py), real processes, no mock.

Device links are connected one after another until both processes (``X-Dragon-Api-Server`` on
the link's upgrade) have served some; every answer, through either process, equals the
centralized greedy reference token for token. Then SIGTERM to the supervisor alone stops every
process of the server: nothing is left behind.

Its own cloud (not the shared e2e cloud): started first, so that it loads while the in-process
reference engine does.
"""

from __future__ import annotations

import json
import os
import signal
import time
import urllib.request

import pytest

import procs
from dragon_vllm.admission import Admission, admission_share
from dragon_vllm.api_server_identity import HEADER, LabelledRegistry
from dragon_vllm.vllm_frontends import ALLOW_UNVERIFIED_ENV, ApiServersUnsupported, check_api_servers_supported
from e2e_world import PUBLIC_QUESTION, TOKEN, ask, options, reference, run

API_SERVERS = 2
MAX_LINKS = 16  # SO_REUSEPORT spreads connections by a hash: both processes are seen long before


# ---------------------------------------------------------------------------- fast, no engine
def test_each_process_admits_within_its_share_so_together_they_never_over_admit():
    whole = Admission(32, 1456)
    shares = [admission_share(whole, 3) for _ in range(3)]
    assert sum(a.max_slots for a in shares) <= 32 and sum(a.max_blocks for a in shares) <= 1456
    assert (shares[0].max_slots, shares[0].max_blocks) == (10, 485)
    assert admission_share(whole, 1) is whole


def test_metrics_carry_the_api_server_label_first():
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    registry = CollectorRegistry()
    Counter("dragon_tokens", "t", ["kind"], registry=registry).labels("link").inc(3)
    text = generate_latest(LabelledRegistry(registry, "api_server", "1")).decode()
    assert 'dragon_tokens_total{api_server="1",kind="link"} 3.0' in text


def test_only_the_checked_vllm_is_allowed_without_the_opt_in(monkeypatch):
    monkeypatch.delenv(ALLOW_UNVERIFIED_ENV, raising=False)
    check_api_servers_supported("0.32.0")
    for version in ("0.26.0", "0.33.1"):
        with pytest.raises(ApiServersUnsupported, match=ALLOW_UNVERIFIED_ENV):
            check_api_servers_supported(version)
    monkeypatch.setenv(ALLOW_UNVERIFIED_ENV, "1")
    check_api_servers_supported("0.26.0")  # a warning, not a refusal


# ---------------------------------------------------------------------------- the real server
@pytest.fixture(scope="module")
def multi_cloud(world):
    """The supervisor process (``dragon-cloud serve --api-servers 2``) and its URL; stopped (the
    whole process group) at the end whatever happened."""
    from dragon_demo import start_cloud, stop

    root = world[0]
    proc, port = start_cloud(root / "index", TOKEN, root / "cloud_api_servers.log",
                             extra_args=("--api-servers", str(API_SERVERS)))
    yield proc, f"http://127.0.0.1:{port}", root / "cloud_api_servers.log"
    stop(proc)


def _health(url: str) -> tuple[int, dict]:
    """(api server index from the header, body) of one /health on a fresh connection."""
    with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
        return int(r.headers[HEADER]), json.loads(r.read())


def wait_all_healthy(proc, url: str, log_path, timeout_s: float = 300.0) -> None:
    """Until /health has answered 200 from every API server (a fresh connection each time, so
    the kernel's hash reaches both)."""
    seen: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(seen) < API_SERVERS:
        assert proc.poll() is None, f"the cloud exited during start-up:\n{log_path.read_text()[-4000:]}"
        assert time.monotonic() < deadline, f"not every API server became healthy: saw {seen}"
        try:
            index, body = _health(url)
            assert body["api_server"] == index
            seen.add(index)
        except OSError:
            time.sleep(0.5)


def wait_all_idle(url: str, timeout_s: float = 60.0) -> None:
    """Until every process reports no link request and no open stream (an answer the cloud is
    still closing would share the engine's batches: vLLM's CPU kernels are not batch-invariant)."""
    idle: set[int] = set()
    deadline = time.monotonic() + timeout_s
    while len(idle) < API_SERVERS:
        assert time.monotonic() < deadline, "the cloud did not go idle"
        index, body = _health(url)
        if not body["link_requests"] and not body["engine"]["open_streams"]:
            idle.add(index)
        else:
            idle.discard(index)
            time.sleep(0.1)


def descendants(pid: int) -> list[int]:
    out = []
    for child in procs.children(pid):
        out += [child.pid, *descendants(child.pid)]
    return out


@pytest.fixture(scope="module")
def want(multi_cloud, e2e_loop, runtime, world, reference_engine):  # multi_cloud first: it loads meanwhile
    """The centralized greedy answer (computed while the cloud loads), once the cloud is up; it
    must differ from the device's answer alone, or the check below would be blind to the cloud."""
    answer = run(e2e_loop, reference(runtime, world[1], reference_engine, options(), question=PUBLIC_QUESTION))
    alone, _ = run(e2e_loop, ask(runtime, None, options(), question=PUBLIC_QUESTION))
    assert answer != alone
    wait_all_healthy(*multi_cloud)
    return answer


@pytest.mark.slow
def test_links_through_both_api_servers_equal_the_centralized_reference(e2e_loop, runtime, multi_cloud, want):
    proc, url, _ = multi_cloud
    served_by: list[int] = []

    def note_api_server() -> None:  # after the second token: the link is up
        # the upgrade's response (aiohttp keeps it on the client WebSocket)
        served_by.append(int(runtime.link._ws._response.headers[HEADER]))

    for _ in range(MAX_LINKS):
        wait_all_idle(url)
        ids, stats = run(e2e_loop, ask(runtime, url, options(), hook=note_api_server, question=PUBLIC_QUESTION))
        assert not stats.degraded and not stats.device_only
        assert ids == want, f"the answer through API server {served_by[-1]} diverged from the reference"
        if set(served_by) == set(range(API_SERVERS)):
            break
    assert set(served_by) == set(range(API_SERVERS)), f"links reached only {served_by}"

    # each process answers /metrics for itself, labelled
    with urllib.request.urlopen(f"{url}/metrics", timeout=5) as r:
        index, text = r.headers[HEADER], r.read().decode()
    assert f'dragon_tokens_total{{api_server="{index}",kind="link"}}' in text


@pytest.mark.slow
def test_sigterm_to_the_supervisor_leaves_no_process(multi_cloud):
    proc, url, log_path = multi_cloud
    family = descendants(proc.pid)
    assert sum("VLLM::EngineCore" in (procs.read(p) or procs.Proc(0, 0, "", 0, "")).cmdline for p in family) == 1
    os.kill(proc.pid, signal.SIGTERM)  # the supervisor alone, not its process group
    assert proc.wait(90) == 0, log_path.read_text()[-3000:]
    assert procs.wait_gone(family, 20) == [], "processes of the server outlived its SIGTERMed supervisor"
