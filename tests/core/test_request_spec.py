"""The request spec and the mode table (``dragon_core.request``, ``dragon_core.modes``): pure."""

from __future__ import annotations

import pytest

from dragon_core import codec
from dragon_core import messages as m
from dragon_core import session as s
from dragon_core import validation as v
from dragon_core.errors import InvalidOptions, MalformedFrame
from dragon_core.modes import ANSWER_MODES, MODES, UnknownMode, mode_rule, wire_mode
from dragon_core.request import SPEC_FIELDS, RequestSpec, engine_temperature

SPEC = RequestSpec(max_tokens=40, seed=3, sampling=m.Sampling(False, 0.7, 5, 0.9), mode="vdrag",
                   aggregator="cloud", scheduling=False, max_depth=4, dist_top_k=16,
                   prior=m.SchedulerPrior(30.0, 10.0, 80.0, 0.8, 0.7), query="q?", k=3, retrieval=False)


def test_the_wire_open_is_the_spec_plus_the_request_id():
    assert set(m.Open.__struct_fields__) == {"request_id", *SPEC_FIELDS}
    msg = SPEC.to_open(9)
    assert msg.request_id == 9 and RequestSpec.from_open(msg) == SPEC


def test_both_sessions_configuration_derives_from_the_spec():
    config = s.SessionConfig.from_open(SPEC.to_open(9), [0], vocab_size=50)
    assert all(getattr(config, name) == getattr(SPEC, name) for name in SPEC_FIELDS)
    assert (config.request_id, config.eos_ids, config.vocab_size) == (9, frozenset({0}), 50)
    assert s.SessionConfig.from_spec(SPEC, 9, [0], vocab_size=50) == config


def test_concord_pins_the_aggregator_on_the_device():
    config = s.SessionConfig(request_id=1, max_tokens=8, seed=0, eos_ids=frozenset(), mode="concord",
                             aggregator="cloud", scheduling=True)
    assert (config.aggregator, config.scheduling, config.depth) == ("device", False, 1)


def test_cloud_only_pins_the_aggregator_on_the_cloud():
    config = s.SessionConfig(request_id=1, max_tokens=8, seed=0, eos_ids=frozenset(), mode="cloud",
                             aggregator="device", scheduling=True)
    assert (config.aggregator, config.scheduling) == ("cloud", False)


@pytest.mark.parametrize("mode,depth", [("dragon", 6), ("vdrag", 1), ("sw", 20), ("cloud", 6), ("text", 6)])
def test_depth_rule_per_mode(mode, depth):
    assert MODES[mode].depth_for(6, 20) == depth
    assert s.SessionConfig(request_id=1, max_tokens=20, seed=0, eos_ids=frozenset(), mode=mode,
                           max_depth=6).depth == depth


def test_every_answer_mode_has_a_row_and_maps_onto_a_wire_mode():
    assert set(MODES) == set(ANSWER_MODES)
    assert {mode: wire_mode(mode) for mode in ANSWER_MODES} == dict(
        dragon="dragon", vdrag="vdrag", sw="sw", cloud="cloud", text="text", concat="text", concord="concord",
        device="dragon")
    assert all(MODES[rule.wire].crosses == rule.crosses or rule.name in ("device",) for rule in MODES.values())
    with pytest.raises(UnknownMode, match="dragon | vdrag"):
        mode_rule("fast")


def test_what_each_mode_does():
    assert [name for name, r in MODES.items() if r.both_draft] == ["dragon", "vdrag", "sw"]
    assert [name for name, r in MODES.items() if r.cloud_streams] == ["dragon", "vdrag", "sw", "cloud", "concord"]
    assert [name for name, r in MODES.items() if not r.device_prefills] == ["cloud"]
    assert [name for name, r in MODES.items() if not r.uses_link] == ["device"]


def test_engine_temperature_is_one_for_greedy_decoding():
    assert engine_temperature(m.Sampling(True, 0.3)) == 1.0
    assert engine_temperature(m.Sampling(False, 0.3)) == 0.3
    assert SPEC.engine_temperature == 0.7


def test_retrieve_every_crosses_the_wire_and_is_bounded():
    spec = RequestSpec(max_tokens=8, seed=1, k=2, retrieve_every=4)
    assert codec.decode(codec.encode(spec.to_open(3))).retrieve_every == 4
    assert RequestSpec.from_open(spec.to_open(3)).retrieve_every == 4
    with pytest.raises(MalformedFrame, match="retrieve_every"):
        codec.decode(codec.encode(RequestSpec(max_tokens=8, seed=1, k=2, retrieve_every=-1).to_open(3)))
    v.check_retrieve_every("dragon", 4)
    v.check_retrieve_every("concord", 0)  # once: every mode
    for mode, every, match in (("concord", 2, "needs mode"), ("text", 1, "needs mode"),
                               ("dragon", 5000, "outside"), ("dragon", 2.0, "integer"), ("sw", True, "integer")):
        with pytest.raises(InvalidOptions, match=match):
            v.check_retrieve_every(mode, every)
