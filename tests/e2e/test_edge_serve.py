"""``dragon-edge serve``: the device as a local OpenAI-compatible server (issue 18).

The real thing: a ``dragon-edge serve`` process (llama.cpp, a copy of the demo's private store)
reaches the shared real cloud (``e2e_world``) through its own netem proxy (RTT 50 ms), and is
asked through the unmodified ``openai`` package over real sockets. Checked: streaming equals
non-streaming and equals the SDK's answer to the same question (greedy DRAGON is exact, so
the HTTP layer must not change a token); a fact only in the private notes appears; DRAGON's
stats and the private/public sources travel in ``dragon``; a lost cloud gives a device-only
answer flagged degraded; bad input gets a 4xx naming the field, never a hang; documents are
added, listed and deleted over HTTP; API keys, the loopback-only policy, SIGTERM. The chat
page runs in headless Chromium when it is installed (skipped, with the reason, otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from benchmarks.netem import Shape, spawn_proxy, stop_proxy
from e2e_world import TOKEN, ask, options, run

pytestmark = [pytest.mark.slow, pytest.mark.llamacpp]

MODEL = "smollm2-135m"
WIFI = "What is the home wifi password?"
SECRET = "plum-tiger-42"  # only in the private note wifi.md
MAX_TOKENS = 24


class EdgeServer:
    """A ``dragon-edge serve`` process and what it was started with."""

    def __init__(self, root: Path, cloud_url: str | None, *extra: str) -> None:
        self.root, self.log_path = root, root / "serve.log"
        port_file = root / "serve.port"
        cmd = [sys.executable, "-m", "dragon_edge.cli", "serve", "--store", str(root / "store"), "--port", "0",
               "--port-file", str(port_file), "--token", TOKEN, *(["--cloud", cloud_url] if cloud_url else []),
               *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log_path.open("w"), stderr=subprocess.STDOUT,
                                     env=dict(os.environ, HF_HUB_OFFLINE="1"), start_new_session=True)
        deadline = time.monotonic() + 120
        while not port_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"dragon-edge serve did not start:\n{self.log()[-3000:]}")
            time.sleep(0.1)
        self.url = f"http://127.0.0.1:{int(port_file.read_text())}"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout_s: float = 20) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        return self.proc.returncode


def http(method: str, url: str, body: dict | bytes | None = None, headers: dict | None = None,
         timeout: float = 60) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, json.loads(r.read() or b"{}")
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read() or b"{}")


@pytest.fixture(scope="module")
def edge(tmp_path_factory, world, cloud):
    """The server, over a copy of the demo's private store (documents are added and deleted
    here), with its cloud behind a netem proxy of its own (the last test cuts it)."""
    root = tmp_path_factory.mktemp("edge_serve")
    shutil.copytree(world[2].path, root / "store")
    one_way = Shape(latency_ms=25, jitter_ms=5)
    proxy, proxy_port = spawn_proxy(("127.0.0.1", cloud.port), up=one_way, down=one_way, seed=18)
    server = EdgeServer(root, f"http://127.0.0.1:{proxy_port}")
    server.proxy, server.proxy_url = proxy, f"http://127.0.0.1:{proxy_port}"
    yield server
    server.stop()
    if proxy.poll() is None:  # the last test stops it
        stop_proxy(proxy)


@pytest.fixture(scope="module")
def client(edge):
    import openai

    return openai.OpenAI(base_url=edge.url + "/v1", api_key="unused-on-loopback", max_retries=0, timeout=120)


# ---------------------------------------------------------------------------- answers
def test_openai_package_gets_a_dragon_answer_streamed_equal_to_whole_and_to_the_sdk(edge, client, runtime,
                                                                                     e2e_loop):
    assert [m.id for m in client.models.list().data] == [MODEL]
    messages = [{"role": "user", "content": WIFI}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS, temperature=0)
    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, max_tokens=MAX_TOKENS,
                                                 temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chunks)
    text = whole.choices[0].message.content
    print(f"\nanswer: {text!r}")
    assert streamed == text and len([c for c in chunks if c.choices[0].delta.content]) > 1
    assert SECRET in text.replace(" ", ""), text  # a fact only the private notes hold

    stats, last = whole.model_extra["dragon"], chunks[-1].model_extra["dragon"]
    for d in (stats, last):  # a DRAGON answer with the cloud, not device-only, not degraded
        assert d["mode"] == "dragon" and not d["device_only"] and not d["degraded"], d
        assert d["bytes_sent"] > 0 and d["bytes_received"] > 0 and sum(d["aggregator_steps"].values()) == d["tokens"]
        sides = {s["side"] for s in d["sources"]}
        assert sides == {"device", "cloud"}, d["sources"]
        assert any(s["side"] == "device" and s["name"].endswith("wifi.md") and SECRET in s["text"]
                   for s in d["sources"])
    assert whole.usage.completion_tokens == stats["tokens"] == last["tokens"]

    # the SDK's runtime, same question and options, through the same kind of link: the same tokens
    ids, sdk_stats = run(e2e_loop, ask(runtime, edge.proxy_url, options(max_tokens=MAX_TOKENS, dist_top_k=32,
                                                                        scheduling=True), question=WIFI))
    assert runtime.tokenizer.decode(ids, skip_special_tokens=True) == text
    assert sdk_stats.tokens == stats["tokens"]

    # /v1/completions: the prompt is the question; DRAGON options in extra_body
    comp = client.completions.create(model=MODEL, prompt=WIFI, max_tokens=MAX_TOKENS, temperature=0,
                                     extra_body={"mode": "vdrag", "k": 1, "cloud_k": 1})
    assert SECRET in comp.choices[0].text.replace(" ", ""), comp.choices[0].text  # the top private passage
    assert comp.model_extra["dragon"]["mode"] == "vdrag" and len(comp.model_extra["dragon"]["sources"]) == 2


def test_device_only_when_asked_and_stop_strings_held_back(client):
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": WIFI}],
                                           max_tokens=MAX_TOKENS, extra_body={"use_cloud": False})
    d = reply.model_extra["dragon"]
    assert d["device_only"] and d["bytes_sent"] == 0 and {s["side"] for s in d["sources"]} == {"device"}
    text = reply.choices[0].message.content
    cut = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": WIFI}],
                                         max_tokens=MAX_TOKENS, stop=["tiger"], stream=True,
                                         extra_body={"use_cloud": False})
    shown = "".join(c.choices[0].delta.content or "" for c in cut)
    assert "tiger" in text and shown == text[:text.index("tiger")]


# ---------------------------------------------------------------------------- bad input
BAD = [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "mode": "warp"}, 400, "mode"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "k": "2"}, 400, "k"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "cloud_k": 0}, 400, "cloud_k"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "aggregator": "moon"}, 400,
     "aggregator"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "use_cloud": "yes"}, 400, "use_cloud"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "temperature": 3}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "logprobs": True}, 400, "logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "retrieval": False}, 400, "retrieval"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "model": "gpt-17"}, 404, "model"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x " * 3000}]}, 400, "messages"),
    ("/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n"),
    ("/v1/chat/completions", b"not json", 400, None),
    ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "caf\\ud800e"}]}', 400, "messages"),
    ("/v1/dragon/documents", {"path": "relative/notes"}, 400, "path"),
    ("/v1/dragon/documents", {"path": "/no/such/folder"}, 400, "path"),
    ("/v1/dragon/documents", {"path": "/tmp", "prune": "yes"}, 400, "prune"),
    ("/v1/dragon/documents", {"text": ""}, 400, "text"),
    ("/v1/dragon/documents", {"path": "/tmp", "upload": "x"}, 400, "upload"),
    ("/v1/dragon/documents", [1, 2], 400, None),
]


@pytest.mark.parametrize("route,body,status,param", BAD, ids=[f"{r.rsplit('/', 1)[1]}-{p}-{i}"
                                                             for i, (r, _, _, p) in enumerate(BAD)])
def test_bad_input_gets_a_4xx_naming_the_field_never_a_hang(edge, route, body, status, param):
    t0 = time.monotonic()
    got, err = http("POST", edge.url + route, body, timeout=10)
    assert (got, err["error"]["param"]) == (status, param), err
    assert err["error"]["message"] and "\n" not in err["error"]["message"]
    assert time.monotonic() - t0 < 5  # refused before any decode


def test_bad_deletes_and_a_pdf_free_folder(edge, tmp_path):
    assert http("DELETE", edge.url + "/v1/dragon/documents?source=/nowhere.md")[0] == 404
    assert http("DELETE", edge.url + "/v1/dragon/documents")[0] == 400  # neither a source nor all=true
    notes = str(Path(edge.root) / "store")  # a folder without documents the store reads
    status, err = http("DELETE", edge.url + "/v1/dragon/documents?source=" + notes + "&all=maybe")
    assert status == 400 and err["error"]["param"] == "all"
    (tmp_path / "empty").mkdir()
    status, err = http("POST", edge.url + "/v1/dragon/documents", {"path": str(tmp_path / "empty")})
    assert status == 400 and err["error"]["type"] == "empty_folder", err


# ---------------------------------------------------------------------------- documents over HTTP
def test_documents_added_listed_answered_from_and_deleted_over_http(edge, client, tmp_path):
    folder = tmp_path / "new-notes"
    folder.mkdir()
    (folder / "locker.md").write_text("My gym locker code is 7319. The gym is open until 9pm.")
    (folder / "bike.md").write_text("The bike lock combination is 5582.")
    (folder / "fifo").mkdir()
    os.mkfifo(folder / "fifo" / "pipe.md")  # never read: skipped with its reason
    status, report = http("POST", edge.url + "/v1/dragon/documents", {"path": str(folder)})
    assert status == 200 and sorted(Path(p).name for p in report["added"]) == ["bike.md", "locker.md"], report
    assert [Path(s["path"]).name for s in report["skipped"]] == ["pipe.md"]
    listed = [d["source"] for d in http("GET", edge.url + "/v1/dragon/documents")[1]["data"]]
    assert str(folder / "locker.md") in listed and any(s.endswith("wifi.md") for s in listed)

    # SmolLM2-135M, greedy, this note alone: "What is the code of my gym locker?" is answered
    # "The code of your gym locker is 7319." unpadded and with the padding in every place tried
    # (benchmarks/bench_padding.py's layouts, llama.cpp); "What is my gym locker code?" quotes
    # "the gym is open until 9pm" instead, unpadded too: only the old padding after "Document:"
    # (or after the document) happened to make it quote the code
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "What is the code of my gym locker?"}],
                                           max_tokens=16, extra_body={"use_cloud": False, "k": 1})
    assert "7319" in reply.choices[0].message.content, reply.choices[0].message.content
    assert reply.model_extra["dragon"]["sources"][0]["name"] == str(folder / "locker.md")

    status, err = http("DELETE", edge.url + f"/v1/dragon/documents?source={folder}")
    assert status == 409 and "folder=true" in err["error"]["message"]  # a folder needs confirming
    status, out = http("DELETE", edge.url + f"/v1/dragon/documents?source={folder}&folder=true")
    assert status == 200 and out["passages_removed"] == 2
    status, out = http("POST", edge.url + "/v1/dragon/documents", {"text": "Our cat is called Miso.", "source": "cat"})
    assert status == 200 and out["passages_added"] == 1
    assert http("DELETE", edge.url + "/v1/dragon/documents?source=cat")[0] == 200
    listed = [d["source"] for d in http("GET", edge.url + "/v1/dragon/documents")[1]["data"]]
    assert not any("new-notes" in s or s == "cat" for s in listed)


# ---------------------------------------------------------------------------- who may ask
def test_api_key_and_loopback_only_policy_in_process(world, runtime, e2e_loop, tmp_path):
    """The app with a key, on a real socket in this process (the shared runtime, device-only)."""
    import openai
    from aiohttp.test_utils import TestServer

    from dragon_edge.serve.app import AppConfig, build_app

    async def main():
        link, runtime.link = runtime.link, None
        server = TestServer(build_app(runtime, world[2], AppConfig(MODEL, api_keys=["s3cret"])), host="127.0.0.1")
        await server.start_server()
        base = f"http://127.0.0.1:{server.port}"
        try:
            good = openai.AsyncOpenAI(base_url=base + "/v1", api_key="s3cret", max_retries=0)
            bad = openai.AsyncOpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0)
            msgs = [{"role": "user", "content": WIFI}]
            with pytest.raises(openai.AuthenticationError):
                await bad.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
            with pytest.raises(openai.AuthenticationError):
                await bad.models.list()
            reply = await good.chat.completions.create(model=MODEL, messages=msgs, max_tokens=4)
            import aiohttp

            async with aiohttp.ClientSession() as http_:
                page = await http_.get(base + "/")  # the page itself is open; it sends the key it is given
                docs = await http_.get(base + "/v1/dragon/documents")  # the store's routes are not
                rebind = await http_.get(base + "/health", headers={"Host": "attacker.example"})
                csrf = await http_.post(base + "/v1/dragon/documents", data=b'{"path": "/etc"}',
                                        headers={"Origin": "https://attacker.example",
                                                 "Authorization": "Bearer s3cret"})
                return reply, page.status, docs.status, rebind.status, csrf.status
        finally:
            await server.close()
            runtime.link = link

    reply, page, docs, rebind, csrf = run(e2e_loop, main())
    assert reply.model_extra["dragon"]["device_only"] and reply.choices[0].message.content
    assert (page, docs, rebind, csrf) == (200, 401, 403, 403)


def test_a_non_loopback_address_needs_a_key_or_insecure():
    out = subprocess.run([sys.executable, "-m", "dragon_edge.cli", "serve", "--host", "0.0.0.0"],
                         capture_output=True, text=True, timeout=60, env={**os.environ, "DRAGON_EDGE_API_KEY": ""})
    assert out.returncode == 2 and out.stderr.startswith("error: --host 0.0.0.0 is not loopback"), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


# ---------------------------------------------------------------------------- the chat page
def test_chat_page_in_headless_chromium_streams_an_answer_and_marks_the_passages(edge, e2e_loop):
    """Runs when Debian's ``chromium`` is installed (``apt-get install chromium``: 131 packages,
    330 MB, not in CI's setup). ``DRAGON_CHAT_SCREENSHOT=docs/chat_page.png`` keeps the
    screenshot (the README's manual command: ``python tests/e2e/headless_chromium.py URL PNG``)."""
    from headless_chromium import find_chromium, watch_page

    if find_chromium() is None:
        pytest.skip("chromium is not installed (apt-get install -y chromium); see the README's manual command")
    from urllib.parse import quote

    page = run(e2e_loop, watch_page(f"{edge.url}/?q={quote(WIFI)}", size=(1100, 720)), timeout=180)
    if os.environ.get("DRAGON_CHAT_SCREENSHOT"):
        Path(os.environ["DRAGON_CHAT_SCREENSHOT"]).write_bytes(page.png)
    assert page.png.startswith(b"\x89PNG") and len(page.png) > 10_000
    answer = page.dom.split('id="answer"')[1].split("</div>")[0]
    assert SECRET in answer.replace(" ", ""), answer
    # streamed: the page showed the answer growing, several partial texts before the whole
    partial = [t for t in page.seen if len(t) < len(page.seen[-1])]
    assert len(partial) >= 2 and all(page.seen[-1].startswith(t) for t in partial), page.seen
    assert 'class="source private"' in page.dom and 'class="source public"' in page.dom and "wifi.md" in page.dom
    for shown in ("acceptance", "rollbacks / handovers", "aggregated on", "B/token"):
        assert shown in page.dom
    assert "degraded" not in page.dom.split('id="stats"')[1].split("</table>")[0]


# ---------------------------------------------------------------------------- losing the cloud, stopping
def test_a_lost_cloud_gives_a_device_only_answer_flagged_degraded(edge, client):
    stop_proxy(edge.proxy)  # the cloud is gone: the link drops, and connecting again fails
    reply = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": WIFI}],
                                           max_tokens=MAX_TOKENS, temperature=0)
    d = reply.model_extra["dragon"]
    assert d["degraded"] and d["device_only"], d
    assert SECRET in reply.choices[0].message.content.replace(" ", "")


def test_sigterm_stops_the_server_gracefully(edge):
    assert edge.stop() == 0
    log = edge.log()
    assert "listening on http://127.0.0.1:" in log and "stopping" in log and log.rstrip().endswith("stopped"), log[-2000:]
    assert "Traceback" not in log
