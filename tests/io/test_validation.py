"""Validation at every entrance (issue 11, part 1): the OpenAI routes, the link's ``Open`` and
the device's options (SDK and CLI). Every bad input gets a 4xx (or a typed refusal / error)
before any work: no decode is started, no stream or task is left behind. No vLLM, no model:
the OpenAI routes run against a fake cloud that records what it was asked."""

from __future__ import annotations

import asyncio
import json
import math
import subprocess
import sys
import time

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dragon_core import messages as m
from dragon_core import validation as v
from dragon_core.errors import DragonError, InvalidOptions
from dragon_vllm.openai_api import OpenAIRoutes

MODEL = "smollm2-135m"


# ------------------------------------------------------------------ a fake cloud
class FakeAnswer:
    finish_reason = "stop"
    created = 0

    def __init__(self, cloud: "FakeCloud") -> None:
        self.cloud = cloud
        cloud.open_answers += 1

    def id(self, prefix: str) -> str:
        return f"{prefix}-fake"

    async def deltas(self):
        for piece in ("Paris", " is", " the capital."):
            yield piece
        await self.aclose()

    async def text(self) -> str:
        return "".join([d async for d in self.deltas()])

    def usage(self) -> dict:
        return dict(prompt_tokens=3, completion_tokens=3, total_tokens=6)

    def stats(self) -> dict:
        return dict(sources=[], streams=1, seconds=0.0)

    async def aclose(self) -> None:
        if self.cloud.open_answers:
            self.cloud.open_answers -= 1


class FakeCloud:
    """Stands in for ``DragonCloud``: records each decode it is asked for."""

    max_model_len = 2048

    def __init__(self) -> None:
        self.calls: list[tuple[str, dict]] = []
        self.open_answers = 0

    async def answer_chat(self, messages, **opts):
        self.calls.append(("chat", opts))
        return FakeAnswer(self)

    async def answer_text(self, prompt, **opts):
        self.calls.append(("text", opts))
        return FakeAnswer(self)


async def _client(cloud: FakeCloud) -> TestClient:
    app = web.Application()
    OpenAIRoutes(cloud, MODEL).add_routes(app)
    client = TestClient(TestServer(app))
    await client.start_server()
    return client


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def chat(**kw) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": "What is the capital of France?"}], **kw}


def comp(**kw) -> dict:
    return {"model": MODEL, "prompt": "The capital of France is", **kw}


CHAT, COMP = "/v1/chat/completions", "/v1/completions"
BIG = 10**30

# (route, body, expected param); body None: sent as raw bytes below
BAD: list[tuple[str, object, str | None]] = [
    # max_tokens: range and types
    (CHAT, chat(max_tokens=-1), "max_tokens"),
    (CHAT, chat(max_tokens=-5), "max_tokens"),
    (CHAT, chat(max_tokens=0), "max_tokens"),
    (CHAT, chat(max_tokens=10**6), "max_tokens"),
    (CHAT, chat(max_tokens=BIG), "max_tokens"),
    (CHAT, chat(max_tokens=1.5), "max_tokens"),
    (CHAT, chat(max_tokens="12"), "max_tokens"),
    (CHAT, chat(max_tokens=True), "max_tokens"),
    (CHAT, chat(max_completion_tokens=-3), "max_completion_tokens"),
    (CHAT, chat(max_completion_tokens=0), "max_completion_tokens"),
    (CHAT, chat(max_completion_tokens=5, max_tokens=5), "max_tokens"),
    (COMP, comp(max_tokens=-1), "max_tokens"),
    (COMP, comp(max_tokens=0), "max_tokens"),
    # sampling
    (CHAT, chat(temperature=2.5), "temperature"),
    (CHAT, chat(temperature=9), "temperature"),
    (CHAT, chat(temperature=-0.1), "temperature"),
    (CHAT, chat(temperature="hot"), "temperature"),
    (COMP, comp(temperature=3), "temperature"),
    (CHAT, chat(top_p=0), "top_p"),
    (CHAT, chat(top_p=1.5), "top_p"),
    (CHAT, chat(top_p=-1), "top_p"),
    (CHAT, chat(top_p=[0.5]), "top_p"),
    (CHAT, chat(top_k=-2), "top_k"),
    (CHAT, chat(top_k=2.5), "top_k"),
    (CHAT, chat(top_k=BIG), "top_k"),
    (CHAT, chat(seed="abc"), "seed"),
    (CHAT, chat(seed=2**70), "seed"),
    (CHAT, chat(seed=1.5), "seed"),
    # n
    (CHAT, chat(n=0), "n"),
    (CHAT, chat(n=2), "n"),
    (CHAT, chat(n=-1), "n"),
    (COMP, comp(n=3), "n"),
    # k (extra field)
    (CHAT, chat(k=1.5), "k"),
    (CHAT, chat(k="2"), "k"),
    (CHAT, chat(k=0), "k"),
    (CHAT, chat(k=-1), "k"),
    (CHAT, chat(k=10**6), "k"),
    (COMP, comp(k=2.7), "k"),
    (CHAT, chat(retrieval="yes"), "retrieval"),
    (CHAT, chat(stream="yes"), "stream"),
    # encodings: a lone surrogate (valid JSON escape, invalid Unicode)
    (CHAT, None, "messages"),
    (COMP, comp(prompt="caf\ud800e"), "prompt"),
    # messages
    (CHAT, {"model": MODEL}, "messages"),
    (CHAT, chat(messages=[]), "messages"),
    (CHAT, chat(messages="hello"), "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": ""}]), "messages"),
    (CHAT, chat(messages=[{"role": "assistant", "content": "hi"}]), "messages"),
    (CHAT, chat(messages=[{"role": "wizard", "content": "hi"}]), "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": 42}]), "messages"),
    (CHAT, chat(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
     "messages"),
    (CHAT, chat(messages=["hello"]), "messages"),
    # completions prompt
    (COMP, {"model": MODEL}, "prompt"),
    (COMP, comp(prompt=""), "prompt"),
    (COMP, comp(prompt=None), "prompt"),
    (COMP, comp(prompt=[]), "prompt"),
    (COMP, comp(prompt=["a", "b"]), "prompt"),
    (COMP, comp(prompt=[1, 2, 3]), "prompt"),
    (COMP, comp(prompt=42), "prompt"),
    # options we do not implement: refused by name, never ignored
    (CHAT, chat(logprobs=True), "logprobs"),
    (CHAT, chat(top_logprobs=3), "top_logprobs"),
    (CHAT, chat(logprobs=True, top_logprobs=3), "logprobs"),
    (CHAT, chat(tools=[{"type": "function", "function": {"name": "f"}}]), "tools"),
    (CHAT, chat(tool_choice="required"), "tool_choice"),
    (CHAT, chat(response_format={"type": "json_object"}), "response_format"),
    (CHAT, chat(presence_penalty=0.5), "presence_penalty"),
    (CHAT, chat(frequency_penalty=1), "frequency_penalty"),
    (CHAT, chat(logit_bias={"42": 10}), "logit_bias"),
    (CHAT, chat(use_beam_search=True), "use_beam_search"),
    (CHAT, chat(whatever=1), "whatever"),
    (COMP, comp(logprobs=2), "logprobs"),
    (COMP, comp(echo=True), "echo"),
    (COMP, comp(best_of=3), "best_of"),
    (COMP, comp(suffix="!"), "suffix"),
    # stop
    (CHAT, chat(stop=5), "stop"),
    (CHAT, chat(stop=["a", 1]), "stop"),
    (CHAT, chat(stop=["a", "b", "c", "d", "e"]), "stop"),
    # types of model / body
    (CHAT, chat(model=5), "model"),
]


def _ids(case):
    route, body, param = case
    return f"{'chat' if route == CHAT else 'comp'}-{param}-{json.dumps(body, ensure_ascii=True)[:60] if body else 'raw'}"


async def _post(client: TestClient, route: str, body) -> tuple[int, dict]:
    if body is None:  # a lone surrogate, escaped as JSON allows
        data = ('{"model": "%s", "messages": [{"role": "user", "content": "caf\\ud800e"}]}' % MODEL).encode()
        resp = await client.post(route, data=data, headers={"Content-Type": "application/json"})
    else:
        resp = await client.post(route, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    return resp.status, await resp.json()


@pytest.mark.parametrize("case", BAD, ids=[_ids(c) for c in BAD])
def test_bad_openai_request_gets_a_400_naming_the_field_and_starts_no_decode(case):
    route, body, param = case

    async def main():
        cloud = FakeCloud()
        client = await _client(cloud)
        try:
            status, err = await _post(client, route, body)
            # the same body streamed: also refused before any stream opens
            if isinstance(body, dict) and param != "stream":
                s2, _ = await _post(client, route, {**body, "stream": True})
                assert s2 == 400
        finally:
            await client.close()
        return cloud, status, err

    cloud, status, err = run(main())
    assert status == 400, err
    assert set(err) == {"error"} and set(err["error"]) == {"message", "type", "param", "code"}
    assert err["error"]["type"] == "invalid_request_error" and err["error"]["code"] == 400
    assert err["error"]["param"] == param, err
    assert err["error"]["message"] and "\n" not in err["error"]["message"]
    assert cloud.calls == [] and cloud.open_answers == 0


@pytest.mark.parametrize("raw", [b"", b"not json", b"[1, 2]", b"42", b'"s"', b"\xff\xfe", b'{"model": '])
def test_bad_json_body_gets_a_400(raw):
    async def main():
        cloud = FakeCloud()
        client = await _client(cloud)
        try:
            resp = await client.post(CHAT, data=raw, headers={"Content-Type": "application/json"})
            return cloud, resp.status, await resp.json()
        finally:
            await client.close()

    cloud, status, err = run(main())
    assert status == 400 and err["error"]["code"] == 400
    assert cloud.calls == []


def test_unknown_model_gets_a_404():
    async def main():
        cloud = FakeCloud()
        client = await _client(cloud)
        try:
            return cloud, *(await _post(client, CHAT, chat(model="gpt-17")))
        finally:
            await client.close()

    cloud, status, err = run(main())
    assert status == 404 and err["error"]["param"] == "model" and "gpt-17" in err["error"]["message"]
    assert cloud.calls == []


GOOD = [
    (CHAT, chat(), dict(max_tokens=128, temperature=None, top_k=None, k=None, retrieval=True)),
    (CHAT, chat(max_tokens=1, temperature=0, top_p=1, top_k=-1, n=1, seed=-7, k=16, retrieval=False),
     dict(max_tokens=1, temperature=0, top_k=None, seed=-7, k=16, retrieval=False)),
    (CHAT, chat(max_completion_tokens=7, temperature=2, top_p=0.01, top_k=0, stop="x"),
     dict(max_tokens=7, temperature=2, top_p=0.01, top_k=None, stop=["x"])),  # stops: the answer stream's
    (CHAT, chat(top_k=40, logprobs=False, presence_penalty=0, frequency_penalty=0.0, user="u",
                response_format={"type": "text"}, tools=[]),
     dict(top_k=40)),
    (CHAT, chat(messages=[{"role": "system", "content": "Be brief."},
                          {"role": "user", "content": [{"type": "text", "text": "Capital of France?"}]}]), {}),
    (COMP, comp(prompt=["one prompt"], max_tokens=1024, stop=["a", "b"]), dict(max_tokens=1024, stop=["a", "b"])),
    (COMP, comp(echo=False, logprobs=None, best_of=1), {}),
]


@pytest.mark.parametrize("route,body,expect", GOOD, ids=[str(i) for i in range(len(GOOD))])
def test_valid_requests_are_served_with_the_options_passed_through(route, body, expect):
    async def main():
        cloud = FakeCloud()
        client = await _client(cloud)
        try:
            resp = await client.post(route, json=body)
            out = await resp.json()
            resp2 = await client.post(route, json={**body, "stream": True})
            text = await resp2.text()
            return cloud, resp.status, out, resp2.status, text
        finally:
            await client.close()

    cloud, status, out, status2, text = run(main())
    assert status == 200, out
    assert status2 == 200 and text.rstrip().endswith("data: [DONE]")
    assert len(cloud.calls) == 2 and cloud.open_answers == 0
    opts = cloud.calls[0][1]
    for key, value in expect.items():
        assert opts[key] == value, (key, opts)


# ------------------------------------------------------------------ fuzzing
_leaf_text = st.text(max_size=8) | st.sampled_from(["\ud800", "a\udfffb", "", " ", "\x00", "é" * 3])
_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _leaf_text
                     | st.sampled_from([-1, 0, 1, 2, 1.5, 2**63, -(2**63) - 1, 10**40]),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=6), kids, max_size=3),
                     max_leaves=8)
_fields = ["model", "messages", "max_tokens", "max_completion_tokens", "temperature", "top_p", "top_k", "n",
           "seed", "stop", "stream", "k", "retrieval", "logprobs", "top_logprobs", "tools", "prompt", "user"]
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "x"]) | _json,
                                  "content": st.text(max_size=20) | _leaf_text | _json})
_body = st.dictionaries(st.sampled_from(_fields) | st.text(max_size=6),
                        _json | st.lists(_message, max_size=3) | st.just(MODEL), max_size=8)


async def _fuzz_post(route: str, body) -> tuple[FakeCloud, int]:
    """One fuzzed request to a fresh fake cloud; a hang fails it (5 s per request and body)."""
    cloud = FakeCloud()
    client = await _client(cloud)
    try:
        resp = await asyncio.wait_for(client.post(route, json=body), 5)
        await asyncio.wait_for(resp.read(), 5)
        return cloud, resp.status
    finally:
        await client.close()


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(body=_body, route=st.sampled_from([CHAT, COMP]))
def test_fuzzed_json_bodies_get_2xx_or_4xx_never_5xx_or_a_hang(body, route):
    cloud, status = asyncio.run(_fuzz_post(route, body))
    assert 200 <= status < 300 or 400 <= status < 500, (status, body)
    if status >= 400:
        assert cloud.calls == []
    assert cloud.open_answers == 0


# ------------------------------------------------------------------ the link's Open
def _open(**kw) -> m.Open:
    base = dict(request_id=1, query="world 0", k=2, max_tokens=5, seed=0)
    return m.Open(**{**base, **kw})


BAD_OPENS = {
    "max_tokens<0": _open(max_tokens=-5),
    "max_tokens=0": _open(max_tokens=0),
    "max_tokens>cap": _open(max_tokens=10**6),
    "k=0": _open(k=0),
    "k>max": _open(k=1000),
    "dist_top_k<0": _open(dist_top_k=-1),
    "dist_top_k huge": _open(dist_top_k=2**40),
    "max_depth=0": _open(max_depth=0),
    "max_depth huge": _open(max_depth=10**9),
    "empty query": _open(query=""),
    "huge query": _open(query="x" * (v.MAX_QUERY_CHARS + 1)),
    "temperature>2": _open(sampling=m.Sampling(False, 9.0)),
    "temperature<0": _open(sampling=m.Sampling(False, -1.0)),
    "temperature nan": _open(sampling=m.Sampling(False, math.nan)),
    "temperature inf": _open(sampling=m.Sampling(False, math.inf)),
    "temperature 0 not greedy": _open(sampling=m.Sampling(False, 0.0)),
    "top_p=0": _open(sampling=m.Sampling(top_p=0.0)),
    "top_p>1": _open(sampling=m.Sampling(top_p=1.5)),
    "top_p nan": _open(sampling=m.Sampling(top_p=math.nan)),
    "top_k<0": _open(sampling=m.Sampling(top_k=-3)),
    "prior nan": _open(prior=m.SchedulerPrior(math.nan, 1.0, 1.0, 0.5, 0.5)),
    "prior negative": _open(prior=m.SchedulerPrior(1.0, -1.0, 1.0, 0.5, 0.5)),
    "prior alpha>1": _open(prior=m.SchedulerPrior(1.0, 1.0, 1.0, 1.5, 0.5)),
}

LINK_ONLY = {"max_tokens>cap", "k>max", "dist_top_k huge", "max_depth huge", "empty query", "huge query",
             "temperature>2", "prior nan", "prior negative", "prior alpha>1"}


@pytest.mark.parametrize("name", list(BAD_OPENS))
def test_bad_open_gets_a_typed_refusal_and_opens_no_stream(name):
    import aiohttp

    from dragon_core import codec
    from dragon_vllm.link import LINK_PATH
    from test_link import IDENTITY, TOKEN, FakeBackend, cloud_server

    async def main():
        backend = FakeBackend()
        async with cloud_server(backend) as (server, url):
            async with aiohttp.ClientSession() as http:
                ws = await http.ws_connect(url + LINK_PATH)
                await ws.send_bytes(codec.encode(IDENTITY.hello(TOKEN)))
                assert isinstance(codec.decode((await ws.receive()).data), m.Welcome)
                await ws.send_bytes(codec.encode(BAD_OPENS[name]))
                await ws.send_bytes(codec.encode(_open(request_id=2)))  # a good one after it is served
                got = {}
                while len(got) < 2:
                    msg = codec.decode((await asyncio.wait_for(ws.receive(), 10)).data)
                    if isinstance(msg, m.Error):
                        got["error"] = msg
                    elif isinstance(msg, m.Opened):
                        got[msg.request_id] = msg
                await ws.close()
                return backend, server, got

    backend, server, got = run(main())
    err = got["error"]
    # refused by the link's check (naming the request) or, for what the codec bounds, as a malformed frame
    assert (err.code, err.request_id) in (("request_rejected", 1), ("malformed_frame", None)), err
    assert err.message and "\n" not in err.message
    if name in LINK_ONLY:  # what the codec lets through, the link refuses by request id
        assert err.code == "request_rejected", err
    assert isinstance(got[2], m.Opened)
    assert len(backend.groups) == 1  # only the good request opened streams


# ------------------------------------------------------------------ the device: SDK, runtime, CLI
BAD_DEVICE = [
    (dict(max_tokens=-5), "max_tokens"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(max_tokens=2.5), "max_tokens"),
    (dict(max_tokens=10**9), "max_tokens"),
    (dict(temperature=9), "temperature"),
    (dict(temperature=-1), "temperature"),
    (dict(temperature=math.nan), "temperature"),
    (dict(top_p=0), "top_p"),
    (dict(top_p=1.01), "top_p"),
    (dict(seed="x"), "seed"),
    (dict(k=-1), "k"),
    (dict(cloud_k=0), "cloud_k"),
    (dict(k="2"), "k"),
    (dict(top_k=-1), "top_k"),
    (dict(aggregator="middle"), "aggregator"),
    (dict(max_depth=0), "max_depth"),
    (dict(dist_top_k=-3), "dist_top_k"),
    (dict(greedy="no"), "greedy"),
    (dict(use_cloud="yes"), "use_cloud"),
    (dict(cloud_open_timeout_s=0), "cloud_open_timeout_s"),
    (dict(emulate_decode_ms=-1.0), "emulate_decode_ms"),
]


@pytest.mark.parametrize("kw,param", BAD_DEVICE, ids=[p + "-" + repr(k) for k, p in BAD_DEVICE])
def test_sdk_refuses_bad_options_at_create_before_loading_anything(kw, param):
    from dragon_edge.sdk import AsyncDragonClient

    async def main():
        client = AsyncDragonClient()  # device-only, nothing loaded until the first answer
        try:
            with pytest.raises(InvalidOptions) as err:
                await client.chat.completions.create(messages=[{"role": "user", "content": "hi"}], **kw)
            assert client._runtime is None if hasattr(client, "_runtime") else True
            return err.value
        finally:
            await client.close()

    exc = run(main())
    assert isinstance(exc, DragonError) and exc.param == param
    assert str(exc) and "\n" not in str(exc)


@pytest.mark.parametrize("messages", [[], [{"role": "user", "content": ""}], [{"role": "user", "content": "a\ud800"}],
                                      [{"role": "assistant", "content": "hi"}]])
def test_sdk_refuses_bad_messages(messages):
    from dragon_edge.sdk import AsyncDragonClient

    async def main():
        client = AsyncDragonClient()
        try:
            with pytest.raises(InvalidOptions) as err:
                await client.chat.completions.create(messages=messages)
            return err.value
        finally:
            await client.close()

    assert run(main()).param == "messages"


def test_runtime_checks_answer_options_itself():
    from dragon_edge.runtime import AnswerOptions, EdgeRuntime

    runtime = EdgeRuntime(engine=None, tokenizer=None, identity=None, eos_ids=[0])  # never reached

    async def main():
        with pytest.raises(InvalidOptions, match="max_tokens"):
            await runtime.answer("q", AnswerOptions(max_tokens=-5)).__anext__()
        with pytest.raises(InvalidOptions, match="query"):
            await runtime.answer("", AnswerOptions()).__anext__()

    run(main())
    assert AnswerOptions().validate() == AnswerOptions()


@pytest.mark.parametrize("args", [["-n", "-5"], ["-n", "0"], ["--temperature", "9"], ["-t", "-1"], ["-k", "-1"],
                                  ["--cloud-k", "0"], ["--aggregator", "middle"], ["--seed", str(2**63)]],
                         ids=lambda a: " ".join(a))
def test_cli_ask_with_a_bad_option_exits_2_with_one_line_quickly(args, tmp_path):
    t0 = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "dragon_edge.cli", "ask", "What is DRAGON?",
                           "--store", str(tmp_path / "none"), *args],
                          capture_output=True, text=True, timeout=60)
    took = time.monotonic() - t0
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = [x for x in proc.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert took < 30  # fails before any model is loaded


# ------------------------------------------------------------------ the shared rules
@pytest.mark.parametrize("fn,value", [
    (lambda x: v.check_max_tokens(x, 10), 11), (lambda x: v.check_max_tokens(x, 10), 0),
    (lambda x: v.check_max_tokens(x, 10), True), (v.check_temperature, 2.0001), (v.check_temperature, math.inf),
    (v.check_top_p, 0.0), (v.check_top_p, math.nan), (v.check_top_k, -2), (v.check_seed, 2**63),
    (lambda x: v.check_text("q", x), "a\udc80"), (lambda x: v.check_text("q", x), b"bytes"),
])
def test_shared_rules_refuse(fn, value):
    with pytest.raises(InvalidOptions):
        fn(value)


def test_shared_rules_accept_the_edges():
    assert v.check_max_tokens(10, 10) == 10 and v.check_temperature(0) == 0 and v.check_temperature(2) == 2
    assert v.check_top_p(1) == 1 and v.check_top_k(-1) == -1 and v.check_top_k(0) == 0
    assert v.check_seed(-(2**63)) == -(2**63) and v.check_text("q", "héllo ✓") == "héllo ✓"


@pytest.mark.parametrize("kw", [dict(max_tokens=-5), dict(max_tokens=0), dict(max_tokens=5000), dict(temperature=3.0),
                                dict(top_p=0.0), dict(top_k=-4), dict(seed=2**64)])
def test_the_cloud_backend_checks_again_before_opening_streams(kw):
    from dragon_vllm.backend import DragonCloud

    class NoEngine:
        opened = 0

        async def open_group(self, prompts, temperature):
            NoEngine.opened += 1
            raise AssertionError("no stream may open for a bad request")

    cloud = DragonCloud(NoEngine(), tokenizer=None, identity=None, eos_ids=[0], max_model_len=2048)
    args = {**dict(max_tokens=5, temperature=None, top_p=None, top_k=None, seed=None, stop=[]), **kw}
    with pytest.raises(InvalidOptions) as err:
        run(cloud._answer([[1, 2, 3]], [0.0], [], **args))
    assert err.value.param == next(iter(kw)) and NoEngine.opened == 0


@settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
@given(over=st.dictionaries(st.sampled_from(_fields), _json | st.lists(_message, max_size=2), max_size=3),
       stream=st.booleans(), route=st.sampled_from([CHAT, COMP]))
def test_fuzzed_fields_of_a_valid_request_never_give_5xx_and_4xx_starts_nothing(over, stream, route):
    body = {**(chat() if route == CHAT else comp()), "stream": stream, **over}

    cloud, status = asyncio.run(_fuzz_post(route, body))
    assert 200 <= status < 300 or 400 <= status < 500, (status, body)
    assert len(cloud.calls) == (1 if status < 300 else 0) and cloud.open_answers == 0


def test_a_temperature_below_vllms_epsilon_is_greedy_on_both_sides():
    """The fuzz test's T = 1.2e-38 overflowed log_softmax(z / T) and the answer never came: below
    ``GREEDY_BELOW`` an OpenAI temperature means greedy decoding (as inside vLLM), and a request
    that asks to *sample* at such a temperature is refused with the parameter named."""
    from dragon_edge.runtime import answer_options

    assert v.temperature_is_greedy(None) and v.temperature_is_greedy(0.0) and v.temperature_is_greedy(1.2e-38)
    assert not v.temperature_is_greedy(v.GREEDY_BELOW) and not v.temperature_is_greedy(0.7)
    assert answer_options(temperature=1.2e-38).greedy and not answer_options(temperature=0.5).greedy
    with pytest.raises(InvalidOptions, match="temperature"):
        v.check_sampling_temperature(False, 1.2e-38)
    v.check_sampling_temperature(True, 1.2e-38)  # greedy: the temperature is not used
