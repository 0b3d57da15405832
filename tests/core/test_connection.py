"""The link connection (``dragon_core.connection``) in memory: bytes in, events out, no sockets.

Both ends are ``LinkConnection`` objects; a test hands one end's frames to the other and reads
the events. Covered: the handshake in order and every refusal, routing by request id (the
cloud holds frames for a request still opening), a bad frame between two interleaved requests
(what the aiohttp links did before the connection existed: the cloud answers a typed error,
the device drops it, both requests go on), ping/pong RTT samples and the dead-peer rule, byte
counts per request.
"""

from __future__ import annotations

import msgspec
import numpy as np
import pytest

from dragon_core import codec
from dragon_core import messages as m
from dragon_core.connection import (Admitted, BadFrame, CloudTerms, LinkConnection, PeerError, Refused,
                                    RequestMessage, RequestOpened, RoundTrip, Send, State, Traffic, Welcomed)
from dragon_core.dist import Dist
from dragon_core.errors import CodecError, HandshakeError, ProtocolError
from dragon_core.handshake import Identity

IDENTITY = Identity("fake-model", "mfp", "tfp", "rfp", "cosine*10")
TOKEN = "s3cret"
T0 = 100.0  # the handshake's time (any unit: the connection has no clock)


def cloud_end(**terms) -> LinkConnection:
    kw = dict(identity=IDENTITY, auth_token=TOKEN, max_k=8, max_tokens=64, max_requests=4)
    kw.update(terms)
    return LinkConnection("cloud", CloudTerms(**kw), peer_timeout_s=3.0, max_frame_bytes=1 << 16)


def handshake(cloud: LinkConnection | None = None) -> tuple[LinkConnection, LinkConnection]:
    device, cloud = LinkConnection("device", peer_timeout_s=3.0), cloud or cloud_end()
    events = cloud.receive(device.hello(IDENTITY.hello(TOKEN, "test")), T0)
    (welcome,) = [e.frame for e in events if isinstance(e, Send)]
    assert device.receive(welcome, T0) == [Welcomed(device.welcome)]
    return device, cloud


def frames(events) -> list[m.Message]:
    return [codec.decode(e.frame) for e in events if isinstance(e, Send)]


def draft(rid: int, step: int) -> m.Draft:
    dist = Dist.full(np.log(np.full(8, 1 / 8)).astype(np.float32))
    return m.Draft(rid, 0, step, 3, codec.dist_to_wire(dist), 0.0)


def target(rid: int, step: int) -> m.Target:
    return m.Target(rid, step, 3, True, 0, 0)


def routed(events) -> list[tuple[int, m.Message]]:
    return [(e.request_id, e.message) for e in events if isinstance(e, RequestMessage)]


def open_requests(device: LinkConnection, cloud: LinkConnection, *rids: int) -> None:
    """The device opens ``rids``; the cloud starts them all."""
    for rid in rids:
        events = cloud.receive(device.send(m.Open(rid, f"q{rid}", k=2, max_tokens=8, seed=rid)), T0)
        assert [type(e) for e in events] == [RequestOpened]
        assert cloud.start(rid) == []


# ---------------------------------------------------------------------------- the handshake
def test_the_handshake_in_order_hello_then_welcome_then_requests():
    device, cloud = LinkConnection("device"), cloud_end()
    assert (device.state, cloud.state) == (State.IDLE, State.AWAIT_HELLO)
    with pytest.raises(ProtocolError, match="before the handshake"):
        device.send(m.Open(1, "q", k=1, max_tokens=4, seed=0))  # nothing before the Hello
    hello = device.hello(IDENTITY.hello(TOKEN, "test-client"))
    assert device.state is State.AWAIT_WELCOME
    with pytest.raises(ProtocolError, match="before the handshake"):
        device.send(m.Open(1, "q", k=1, max_tokens=4, seed=0))  # nor before the Welcome
    send, admitted = cloud.receive(hello, T0)
    welcome = codec.decode(send.frame)
    assert welcome == m.Welcome(m.PROTOCOL_VERSION, "dragon-cloud/fake-model", 8, 64, 1 << 16)
    assert admitted == Admitted(IDENTITY.hello(TOKEN, "test-client"), None)  # the shared token: no name
    assert device.receive(send.frame, T0 + 1) == [Welcomed(welcome)]
    assert device.is_open and cloud.is_open and device.welcome == welcome
    assert device.liveness.last_heard == T0 + 1 and cloud.liveness.last_heard == T0
    with pytest.raises(ProtocolError):
        device.hello(IDENTITY.hello(TOKEN))  # one handshake per socket


def test_a_named_device_token_is_the_identity_and_no_token_is_checked_without_one():
    cloud = cloud_end(auth_token=None, device_tokens={"alice": "alice-token-0001"})
    events = LinkConnection("device")
    send, admitted = cloud.receive(events.hello(IDENTITY.hello("alice-token-0001")), T0)
    assert isinstance(codec.decode(send.frame), m.Welcome) and admitted.device_name == "alice"
    open_cloud = cloud_end(auth_token=None)
    assert isinstance(open_cloud.receive(LinkConnection("device").hello(IDENTITY.hello("anything")), T0)[1],
                      Admitted)


def hello_with(**changes) -> bytes:
    fields = {f: getattr(IDENTITY.hello(TOKEN), f) for f in m.Hello.__struct_fields__}
    fields.update(changes)
    return codec.encode(m.Hello(**fields))


REFUSALS = {  # first frame -> (error code, words of the message)
    "wrong token": (hello_with(auth_token="wrong"), "auth_failed", "invalid auth token"),
    "wrong protocol version (Hello)": (hello_with(protocol_version=m.PROTOCOL_VERSION + 1), "unsupported_version",
                                       f"protocol version {m.PROTOCOL_VERSION + 1}"),
    "wrong protocol version (frame)": (b"DG\x63" + codec.encode(IDENTITY.hello(TOKEN))[3:], "unsupported_version",
                                       "protocol version 99"),
    # a protocol-5 device's Hello as it wrote it (DG, 5, msgspec's own msgpack); our reply keeps
    # the DG + version header, so that device reads it as version 6: typed on both ends
    "a protocol-5 device": (b"DG\x05" + msgspec.msgpack.encode(msgspec.structs.replace(IDENTITY.hello(TOKEN),
                                                                                      protocol_version=5)),
                            "unsupported_version", "protocol version 5"),
    "other model": (hello_with(model="other"), "fingerprint_mismatch", "model differs"),
    "model fingerprint": (hello_with(model_fingerprint="x"), "fingerprint_mismatch", "model fingerprint differs"),
    "tokenizer fingerprint": (hello_with(tokenizer_fingerprint="x"), "fingerprint_mismatch",
                              "tokenizer fingerprint differs"),
    "retriever fingerprint": (hello_with(retriever_fingerprint="x"), "fingerprint_mismatch",
                              "retriever fingerprint differs"),
    "score function": (hello_with(score_function="dot"), "fingerprint_mismatch", "score function differs"),
    "a request before the Hello": (codec.encode(m.Open(1, "q", k=1, max_tokens=4, seed=0)), "handshake_failed",
                                   "expected Hello, got Open"),
    "a ping before the Hello": (codec.encode(m.Ping(0, 1.0)), "handshake_failed", "expected Hello, got Ping"),
    "garbage": (b"\x00garbage\xff", "malformed_frame", "bad magic"),
    "oversized": (codec.HEADER + b"\x00" * (1 << 17), "frame_too_large", "exceeds the limit"),
}


@pytest.mark.parametrize("case", list(REFUSALS))
def test_every_handshake_refusal_is_a_typed_error_then_the_end(case):
    frame, code, words = REFUSALS[case]
    cloud = cloud_end()
    send, refused = cloud.receive(frame, T0)
    (error,) = frames([send])
    assert isinstance(refused, Refused) and refused.error.code == code == error.code
    assert words in error.message and error.request_id is None
    assert send.frame[:3] == codec.HEADER  # a peer of any version reads the refusal's version
    assert cloud.state is State.CLOSED
    # nothing is served after a refusal, not even a good Hello
    assert cloud.receive(codec.encode(IDENTITY.hello(TOKEN)), T0) == []
    with pytest.raises(ProtocolError):
        cloud.send(m.Ping(0, 1.0))


def test_named_tokens_only_refuse_any_other_token():
    cloud = cloud_end(auth_token=None, device_tokens={"alice": "alice-token-0001"})
    send, refused = cloud.receive(hello_with(auth_token=TOKEN), T0)
    assert refused.error.code == "auth_failed"


def test_the_host_refuses_what_the_connection_cannot_see_a_timeout_or_a_text_frame():
    cloud = cloud_end()
    send, refused = cloud.refuse(HandshakeError("no Hello within the handshake timeout"))
    assert frames([send]) == [m.Error("handshake_failed", "no Hello within the handshake timeout")]
    assert isinstance(refused, Refused) and cloud.state is State.CLOSED


def test_the_device_raises_on_a_refusal_or_any_other_reply():
    device = LinkConnection("device")
    device.hello(IDENTITY.hello("wrong"))
    with pytest.raises(HandshakeError, match="cloud refused the link: auth_failed: invalid auth token"):
        device.receive(codec.encode(m.Error("auth_failed", "invalid auth token")), T0)
    assert device.state is State.CLOSED
    device.hello(IDENTITY.hello(TOKEN))  # a new socket may try again
    with pytest.raises(ProtocolError, match="unexpected handshake reply Ping"):
        device.receive(codec.encode(m.Ping(0, 1.0)), T0)
    device.hello(IDENTITY.hello(TOKEN))
    with pytest.raises(CodecError):
        device.receive(b"junk", T0)
    assert device.state is State.CLOSED


def test_a_second_hello_or_a_welcome_after_the_handshake_is_a_protocol_error_not_the_end():
    device, cloud = handshake()
    for msg in (IDENTITY.hello(TOKEN), m.Welcome(1, "x", 1, 1, 1 << 16)):
        events = cloud.receive(codec.encode(msg), T0)
        (error,) = frames(events)
        assert error.code == "protocol_error" and f"unexpected {type(msg).__name__}" in error.message
        assert isinstance(events[-1], BadFrame) and cloud.is_open
    # the device drops what it should never get, and says nothing back
    events = device.receive(codec.encode(m.Open(1, "q", k=1, max_tokens=4, seed=0)), T0)
    assert [type(e) for e in events] == [BadFrame] and device.is_open


def test_a_lost_device_socket_keeps_its_requests_and_ids_for_the_next_one():
    device, cloud = handshake()
    rid = device.new_request_id()
    device.send(m.Open(rid, "q", k=1, max_tokens=4, seed=0))
    device.lost()
    assert device.state is State.CLOSED and device.requests == [rid]
    assert device.receive(codec.encode(target(rid, 0)), T0) == []  # a late frame of the old socket
    device.hello(IDENTITY.hello(TOKEN))  # a new socket: the same connection handshakes again
    device.receive(codec.encode(m.Welcome(1, "x", 8, 64, 1 << 16)), T0)
    assert device.is_open and device.new_request_id() == rid + 1 and device.requests == [rid]


# ---------------------------------------------------------------------------- routing
def test_routing_by_request_id_on_the_device():
    device, cloud = handshake()
    r1, r2 = device.new_request_id(), device.new_request_id()
    for rid in (r1, r2):
        device.send(m.Open(rid, f"q{rid}", k=1, max_tokens=4, seed=0))
    msgs = [m.Opened(r2, ["public-1"]), draft(r1, 0), target(r2, 0), m.Tokens(r1, 1, [4, 5]),
            m.Error("quota_exceeded", "over", r2), m.Cancel(r1, "done"), draft(99, 0)]  # 99: never opened
    events = [e for msg in msgs for e in device.receive(codec.encode(msg), T0)]
    assert routed(events) == [(msg.request_id, msg) for msg in msgs[:-1]]
    device.end(r1)
    assert device.receive(codec.encode(target(r1, 1)), T0) == []  # after the answer: dropped
    assert device.receive(codec.encode(m.Error("busy", "later")), T0) == [PeerError(m.Error("busy", "later"))]


def test_the_cloud_holds_frames_for_a_request_until_it_starts_and_refuses_ids_in_use():
    device, cloud = handshake()
    opened = cloud.receive(device.send(m.Open(1, "q", k=2, max_tokens=8, seed=0)), T0)
    assert opened == [RequestOpened(m.Open(1, "q", k=2, max_tokens=8, seed=0))]
    early = [draft(1, 0), target(1, 0)]
    assert [e for msg in early for e in cloud.receive(codec.encode(msg), T0)] == []  # held, in order
    assert cloud.start(1) == early
    assert routed(cloud.receive(codec.encode(draft(1, 1)), T0)) == [(1, draft(1, 1))]
    # the same id again: refused, and request 1 is untouched
    (error,) = frames(cloud.receive(codec.encode(m.Open(1, "again", k=2, max_tokens=8, seed=0)), T0))
    assert error == m.Error("request_rejected", "request id 1 is already in use on this connection", 1)
    assert cloud.requests == [1]
    # the host's own refusal (an option, a quota) takes the request out of the table
    cloud.receive(codec.encode(m.Open(2, "q", k=2, max_tokens=8, seed=0)), T0)
    assert codec.decode(cloud.refuse_request(2, "quota_exceeded", "over")) == m.Error("quota_exceeded", "over", 2)
    assert cloud.requests == [1] and cloud.receive(codec.encode(draft(2, 0)), T0) == []


def test_the_cloud_refuses_more_requests_than_its_limit_on_one_connection():
    device, cloud = handshake(cloud_end(max_requests=2))
    open_requests(device, cloud, 1, 2)
    (error,) = frames(cloud.receive(device.send(m.Open(3, "q", k=1, max_tokens=4, seed=0)), T0))
    assert error.code == "request_rejected" and "limit 2" in error.message and error.request_id == 3
    cloud.end(1)
    assert [type(e) for e in cloud.receive(codec.encode(m.Open(3, "q", k=1, max_tokens=4, seed=0)), T0)] \
        == [RequestOpened]


@pytest.mark.parametrize("bad", [b"\x00garbage\xff", codec.HEADER + b"\xc1", b"DG\x63rest"], ids=["magic", "body", "version"])
def test_a_bad_frame_between_two_interleaved_requests_harms_neither(bad):
    """As the aiohttp links did: the cloud answers a connection-level typed error (no request
    id) and goes on; the device drops the frame; both requests keep being routed, and the bad
    frame counts for the connection only."""
    device, cloud = handshake()
    open_requests(device, cloud, 1, 2)
    up = [draft(1, 0), draft(2, 0), None, target(1, 0), draft(2, 1), None, target(2, 0)]  # None: the bad frame
    events = [e for msg in up for e in cloud.receive(bad if msg is None else codec.encode(msg), T0)]
    assert routed(events) == [(msg.request_id, msg) for msg in up if msg is not None]
    errors = frames(events)
    assert len(errors) == 2 and all(e.request_id is None and e.code in ("malformed_frame", "unsupported_version")
                                    for e in errors)
    assert sum(isinstance(e, BadFrame) for e in events) == 2 and cloud.is_open
    down = [draft(2, 0), None, target(1, 0), draft(1, 1)]
    events = [e for msg in down for e in device.receive(bad if msg is None else codec.encode(msg), T0)]
    assert routed(events) == [(msg.request_id, msg) for msg in down if msg is not None]
    assert [type(e) for e in events if not isinstance(e, RequestMessage)] == [BadFrame]  # nothing sent back
    for rid in (1, 2):  # the bad frames are in no request's count
        mine = sum(len(codec.encode(x)) for x in up if x is not None and x.request_id == rid)
        assert cloud.request_traffic(rid).received == mine + len(codec.encode(m.Open(rid, f"q{rid}", k=2,
                                                                                       max_tokens=8, seed=rid)))


def test_a_text_frame_gets_a_typed_error_from_the_cloud_and_nothing_from_the_device():
    device, cloud = handshake()
    (error,) = frames(cloud.receive_text())
    assert error == m.Error("malformed_frame", "text frames are not part of the protocol")
    assert [type(e) for e in device.receive_text()] == [BadFrame]


# ---------------------------------------------------------------------------- ping, pong, liveness
def test_ping_pong_gives_rtt_samples_on_the_pinging_side():
    device, cloud = handshake()
    ping = device.ping(T0 + 1.0)
    (pong,) = cloud.receive(ping, T0 + 1.02)
    assert isinstance(pong, Send) and codec.decode(pong.frame) == m.Pong(0, T0 + 1.0)
    assert device.receive(pong.frame, T0 + 1.05) == [RoundTrip(pytest.approx(50.0))]
    assert device.rtt_ms == pytest.approx(50.0) and cloud.rtt_ms is None
    (pong,) = device.receive(cloud.ping(T0 + 2.0), T0 + 2.0)  # the cloud pings too: nonces count up
    assert codec.decode(pong.frame) == m.Pong(0, T0 + 2.0)
    assert cloud.receive(pong.frame, T0 + 2.3) == [RoundTrip(pytest.approx(300.0))]
    assert codec.decode(device.ping(T0 + 3)).nonce == 1


def test_every_frame_is_life_and_a_silent_peer_is_lost_by_the_liveness_rule():
    device, cloud = handshake()
    live = cloud.liveness  # dragon_core.liveness.PeerLiveness.for_link(3.0): checks every 0.1
    checks = [T0 + i / 10 for i in range(1, 61)]
    assert not any(live.lost(t) for t in checks[:25])
    cloud.receive(codec.encode(m.Cancel(7)), T0 + 2.5)  # any frame is life, even one for no request
    assert live.last_heard == T0 + 2.5
    assert not any(live.lost(t) for t in checks[25:55])  # silent for 3.0 at most: not yet
    assert live.lost(checks[55])  # 3.1
    off = LinkConnection("device", peer_timeout_s=0)
    off.hello(IDENTITY.hello(TOKEN))
    off.receive(codec.encode(m.Welcome(1, "x", 8, 64, 1 << 16)), T0)
    assert not off.liveness.enabled


# ---------------------------------------------------------------------------- byte counts
def test_byte_counts_per_request_are_the_frames_that_carry_its_id():
    device, cloud = handshake()
    up_total, down_total = device.traffic.sent, device.traffic.received  # the Hello, the Welcome
    r1, r2 = device.new_request_id(), device.new_request_id()
    sizes = {r1: Traffic(), r2: Traffic()}
    for rid in (r1, r2):
        frame = device.send(m.Open(rid, "q" * (10 * rid), k=2, max_tokens=8, seed=0))
        cloud.receive(frame, T0)
        cloud.start(rid)
        sizes[rid].sent += len(frame)
        up_total += len(frame)
    # interleaved both ways, with pings and a connection-level error between
    up = [draft(r1, 0), draft(r2, 0), m.Ping(0, 1.0), target(r1, 0), m.Cancel(r2, "stop")]
    down = [m.Opened(r2, ["a", "b"]), draft(r1, 0), m.Error("x", "y"), target(r2, 0), m.Tokens(r1, 1, [1, 2, 3])]
    for msg_up, msg_down in zip(up, down):
        frame = device.send(msg_up)
        up_total += len(frame)
        for pong in [e.frame for e in cloud.receive(frame, T0) if isinstance(e, Send)]:
            device.receive(pong, T0)
            down_total += len(pong)
        if hasattr(msg_up, "request_id"):
            sizes[msg_up.request_id].sent += len(frame)
        frame = cloud.send(msg_down)
        device.receive(frame, T0)
        down_total += len(frame)
        if msg_down.request_id is not None:
            sizes[msg_down.request_id].received += len(frame)
    for rid in (r1, r2):
        assert device.request_traffic(rid) == sizes[rid]
        assert cloud.request_traffic(rid) == Traffic(sizes[rid].received, sizes[rid].sent)  # the mirror
    assert sizes[r1] != sizes[r2] and sizes[r1].sent and sizes[r2].received
    # the connection counts every frame: the handshake, the pings, the connection-level error
    assert device.traffic == Traffic(up_total, down_total) == Traffic(cloud.traffic.received, cloud.traffic.sent)
    # the final count leaves the table with the request; later frames count for the link only
    assert device.end(r1) == sizes[r1] and device.request_traffic(r1) == Traffic()
    frame = cloud.send(target(r1, 1))
    device.receive(frame, T0)
    assert device.traffic.received == down_total + len(frame) and device.end(r1) == Traffic()
