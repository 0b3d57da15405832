"""CONCORD's options at every entrance (issue 14; docs/CONCORD.md): ``AnswerOptions`` into the
request spec, the typed refusal of sampling before anything starts (SDK options, the OpenAI
routes' extras, the CLI exits 2), the CLI flags, and the counters copied into ``AnswerStats``.
No model, no network."""

from __future__ import annotations

import math

import pytest
from typer.testing import CliRunner

from dragon_core import session as s
from dragon_core.errors import InvalidOptions
from dragon_core.modes import mode_rule
from dragon_edge import cli
from dragon_edge.runtime import AnswerOptions, answer_options
from dragon_edge.serve.extras import EdgeExtras
from dragon_edge.stats import CONCORD_COUNTS, Timing, answer_stats


def test_concord_settings_reach_the_request_spec_and_the_open():
    opts = answer_options(None, None, None, None, dict(mode="concord", concord_debt_max=math.inf, concord_top_m=3))
    spec = opts.spec("q", aggregator="device", prior=None)
    assert (spec.mode, spec.concord_debt_max, spec.concord_top_m) == ("concord", math.inf, 3)
    msg = spec.to_open(7)
    assert (msg.concord_debt_max, msg.concord_top_m) == (math.inf, 3)
    assert AnswerOptions().spec("q", aggregator="device", prior=None).concord_debt_max == 4.0  # the default


@pytest.mark.parametrize("temperature", [0.7, 2.0, 1e-4])
def test_concord_with_sampling_is_a_typed_error(temperature):
    with pytest.raises(InvalidOptions) as exc:
        answer_options(None, temperature, None, None, dict(mode="concord"))
    assert exc.value.param == "temperature" and "greedy" in str(exc.value)
    answer_options(None, 0.0, None, None, dict(mode="concord"))  # greedy is fine
    answer_options(None, temperature, None, None, dict(mode="dragon"))  # other modes sample


@pytest.mark.parametrize("extra, param", [
    (dict(concord_debt_max=math.nan), "concord_debt_max"),
    (dict(concord_debt_max="4"), "concord_debt_max"),
    (dict(concord_debt_max=True), "concord_debt_max"),
    (dict(concord_top_m=-1), "concord_top_m"),
    (dict(concord_top_m=4097), "concord_top_m"),
    (dict(concord_top_m=1.5), "concord_top_m"),
])
def test_bad_concord_settings_name_their_field(extra, param):
    with pytest.raises(InvalidOptions) as exc:
        answer_options(None, None, None, None, dict(mode="concord", **extra))
    assert exc.value.param == param


@pytest.mark.parametrize("debt", [math.inf, -math.inf, 0, -3.5, 1e9])
def test_concord_debt_extremes_are_allowed(debt):
    assert answer_options(None, None, None, None, dict(mode="concord", concord_debt_max=debt)).concord_debt_max == debt


def test_openai_extras_take_the_concord_fields_and_refuse_sampling():
    extras = EdgeExtras()
    assert {"concord_debt_max", "concord_top_m"} <= extras.names
    p = {"mode": "concord", "concord_debt_max": math.inf, "concord_top_m": 2, "temperature": 0}
    extras.check(p)
    assert extras.options(p) == {"mode": "concord", "concord_debt_max": math.inf, "concord_top_m": 2}
    with pytest.raises(InvalidOptions) as exc:
        extras.check({"mode": "concord", "temperature": 0.8})
    assert exc.value.param == "temperature"
    extras.check({"mode": "dragon", "temperature": 0.8})  # unchanged for the other modes
    with pytest.raises(InvalidOptions):
        extras.check({"mode": "concord", "concord_top_m": -2})


def test_cli_flags_and_the_refusal(monkeypatch):
    runner = CliRunner()
    res = runner.invoke(cli.app, ["ask", "--mode", "concord", "-t", "0.5", "hi"])
    assert res.exit_code == 2 and "greedy" in res.output and "--temperature" in res.output
    res = runner.invoke(cli.app, ["ask", "--mode", "concord", "--concord-debt-max", "nan", "hi"])
    assert res.exit_code == 2 and "--concord-debt-max" in res.output
    seen = {}

    async def fake_ask(client, messages, opts, show_stats, as_json):
        seen.update(opts)
        return ""

    class Client:
        async def close(self):
            pass

    monkeypatch.setattr(cli, "_client", lambda *a, **k: Client())
    monkeypatch.setattr(cli, "_ask", fake_ask)
    res = runner.invoke(cli.app, ["ask", "--mode", "concord", "--concord-debt-max", "-inf", "--concord-top-m", "2", "hi"])
    assert res.exit_code == 0, res.output
    assert seen["mode"] == "concord" and seen["concord_debt_max"] == -math.inf and seen["concord_top_m"] == 2
    seen.clear()
    res = runner.invoke(cli.app, ["ask", "hi"])
    assert res.exit_code == 0 and "concord_debt_max" not in seen  # other modes: the same options as before


def _session(mode: str) -> s.Session:
    config = s.SessionConfig(request_id=1, max_tokens=8, seed=0, eos_ids=frozenset(), mode=mode)
    return s.Session("device", config, 0.0, solo=True)


def test_answer_stats_carry_the_concord_counters():
    sess = _session("concord")
    st = sess.stats
    st.steps_certified, st.steps_dense, st.steps_local, st.steps_supplemented = 5, 1, 2, 1
    st.evidence_requests, st.waited_ms = 3, 12.5
    sess.committed = list(range(8))
    stats = answer_stats(mode="concord", rule=mode_rule("concord"), private=[], public=None, opened=None,
                         device_only=False, session=sess, finish=s.Finish("length"), timing=Timing(0.0), traffic=None)
    assert (stats.steps_certified, stats.steps_dense, stats.steps_local, stats.steps_consulted) == (5, 1, 2, 6)
    assert stats.steps_supplemented == 1 and stats.evidence_requests == 3 and stats.waited_ms == 12.5
    d = stats.as_dict()
    assert all(name in d for name in CONCORD_COUNTS)
    assert "concord: certified 5, dense 1, local 2" in cli.format_stats(d)
    other = answer_stats(mode="dragon", rule=mode_rule("dragon"), private=[], public=None, opened=None,
                         device_only=False, session=_session("dragon"), finish=s.Finish("length"),
                         timing=Timing(0.0), traffic=None)
    assert other.steps_certified is None and "concord" not in cli.format_stats(other.as_dict())


def test_openai_route_answers_400_naming_temperature_for_sampling_in_mode_concord():
    """The local server's route (dragon_http.OpenAIRoutes with the device's extras): the refusal is
    a 400 in OpenAI's error shape, before the backend is asked for anything."""
    import asyncio

    from aiohttp import web
    from aiohttp.test_utils import TestClient, TestServer

    from dragon_http.openai_routes import OpenAIRoutes

    class Backend:
        max_model_len = 2048
        asked = 0

        async def answer_chat(self, messages, **opts):
            Backend.asked += 1
            raise AssertionError("the backend must not be reached")

    async def main():
        app = web.Application()
        OpenAIRoutes(Backend(), "m", max_tokens=64, extras=EdgeExtras()).add_routes(app)
        async with TestClient(TestServer(app)) as client:
            body = dict(model="m", messages=[{"role": "user", "content": "hi"}], mode="concord", temperature=0.7)
            r = await client.post("/v1/chat/completions", json=body)
            refused = r.status, (await r.json())["error"]
            r = await client.post("/v1/chat/completions", json=dict(body, temperature=0, concord_top_m=-1))
            bad_m = r.status, (await r.json())["error"]
        return refused, bad_m

    (status, err), (status_m, err_m) = asyncio.run(main())
    assert status == 400 and err["param"] == "temperature" and "greedy" in err["message"]
    assert status_m == 400 and err_m["param"] == "concord_top_m"
    assert Backend.asked == 0
