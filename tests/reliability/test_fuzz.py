"""Fuzz slice: thousands of structure-aware and byte-level frames through the real
``Daemon.handle_frame`` in-process, then a few hundred through a real tokencaked process.

Every frame must get exactly one reply that decodes, echoes the request id, and carries a
typed error code other than ``internal`` when it fails; a failed request must leave the
store, the registry, the engines and the scheduler exactly as they were. The long run
(>= 100k cases, plus atheris) is ``bench/bench_fuzz.py``.
"""

from __future__ import annotations

import random
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import zmq
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bench.common.fuzz_harness import (
    IDENTITY,
    FrameGen,
    InProcessDaemon,
    check_case,
)
from tests.daemon.test_server import snapshot
from tests.procs import start
from tokencake import protocol as p
from tokencake.clients.client import TokenCakeClient
from tokencake.protocol import ErrorCode


def _settings(max_examples: int) -> settings:
    return settings(
        max_examples=max_examples,
        suppress_health_check=[  # replaces the profile's list, so too_slow again
            HealthCheck.too_slow,
            HealthCheck.data_too_large,
            HealthCheck.function_scoped_fixture,
        ],
    )


@pytest.fixture(scope="module")
def ipd() -> Iterator[InProcessDaemon]:
    with tempfile.TemporaryDirectory(prefix="tcfuzz-") as tmp:
        d = InProcessDaemon(Path(tmp))
        d.seed()
        yield d
        d.close()


@_settings(400)
@given(seed=st.integers(min_value=0, max_value=2**64))
def test_generated_frames_in_process(ipd: InProcessDaemon, seed: int) -> None:
    ipd.seed()
    gen = FrameGen(random.Random(seed), ipd)
    for _ in range(4):
        check_case(ipd, gen.frame()[1])


@_settings(300)
@given(frame=st.binary(max_size=256))
def test_arbitrary_bytes_in_process(ipd: InProcessDaemon, frame: bytes) -> None:
    check_case(ipd, frame)


_msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats()
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@_settings(200)
@given(
    op=st.sampled_from(sorted(p.REQUEST_TYPES)),
    request_id=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    body=st.dictionaries(
        st.sampled_from(
            sorted({f.name for c in p.REQUEST_TYPES.values() for f in msgspec.structs.fields(c)})
        ),
        _msgpack_values,
        max_size=6,
    ),
)
def test_typed_bodies_in_process(
    ipd: InProcessDaemon, op: str, request_id: int, body: dict[str, Any]
) -> None:
    frame = msgspec.msgpack.encode({"v": 1, "op": op, "id": request_id, "body": body})
    check_case(ipd, frame)


def test_invalid_utf8_gets_typed_errors(ipd: InProcessDaemon) -> None:
    """msgspec raises UnicodeDecodeError (not DecodeError) for a non-UTF-8 str; it used to
    come back as ``internal``."""
    bad_op = b"\x83\xa1v\x01\xa2op\xa2\xff\xfe\xa2id\x07"
    env = p.decode_reply_envelope(ipd.daemon.handle_frame(IDENTITY, bad_op))
    assert env.error is not None and env.error.code == ErrorCode.BAD_FRAME
    bad_body = b"\x84\xa1v\x01\xa2op\xa6lookup\xa2id\x09\xa4body\x81\xa9engine_id\xa2\xc3\x28"
    env = p.decode_reply_envelope(ipd.daemon.handle_frame(IDENTITY, bad_body))
    assert env.error is not None and env.error.code == ErrorCode.BAD_REQUEST
    assert env.id == 9 and env.op == "lookup"
    check_case(ipd, bad_op)
    check_case(ipd, bad_body)


@pytest.mark.parametrize(
    "frame",
    [
        b"\x91" * 100_000 + b"\xc0",
        b"\x84\xa1v\x01\xa2op\xa4ping\xa2id\x07\xa4body" + b"\x91" * 100_000 + b"\xc0",
        b"\x84\xa1v\x01\xa2op\xa4ping\xa2id\x07\xa4body" + b"\x81\xa1a" * 100_000 + b"\xc0",
        b"\x84\xa1v\x01\xa2op\xa4ping\xa2id\x07\xa4body" + b"\x91" * (5 << 20) + b"\xc0",
    ],
    ids=["top", "body-arrays", "body-maps", "oversized"],
)
def test_deeply_nested_frames_get_typed_errors(ipd: InProcessDaemon, frame: bytes) -> None:
    """msgspec raises RecursionError (not DecodeError) past its nesting limit; it came back
    as ``internal`` with a traceback in the log (found by the 1M-case fuzz run)."""
    env = p.decode_reply_envelope(ipd.daemon.handle_frame(IDENTITY, frame))
    assert env.error is not None
    assert env.error.code in (ErrorCode.BAD_FRAME, ErrorCode.FRAME_TOO_LARGE)
    check_case(ipd, frame)


def _real_state(c: TokenCakeClient) -> dict[str, Any]:
    """The real daemon's store, engines and apps (scheduler decisions can tick meanwhile)."""
    snap = snapshot(c)
    snap["stats"].pop("decisions")
    snap.pop("agents")
    return snap


def test_fuzz_frames_against_a_real_daemon(tmp_path: Path) -> None:
    """A shadow in-process daemon sees the same frames in the same order: the real process
    must answer each with the same outcome, one reply each, and stay up."""
    # The same arena size as the shadow's, so slot numbers mean the same on both sides.
    d = start(
        tmp_path,
        "--lease-s",
        "600",
        env={"TOKENCAKE_ENGINE_TIMEOUT_S": "600"},
        arena="1MiB",
    )
    shadow = InProcessDaemon(tmp_path)
    recorded = shadow.seed_recorded()
    ctx: zmq.Context[zmq.Socket[bytes]] = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(d.endpoint)

    def roundtrip(frame: bytes) -> p.ReplyEnvelope:
        sock.send(frame)
        while True:
            assert sock.poll(10000), "no reply from the daemon"
            env = p.decode_reply_envelope(sock.recv())
            if env.id != 0 or env.op != p.DECISION_PUSH_OP:
                return env

    try:
        for frame in recorded:
            assert roundtrip(frame).ok
        gen = FrameGen(random.Random(20261125), shadow)
        failed = 0
        with TokenCakeClient(d.endpoint) as c:
            for _ in range(300):
                _, frame = gen.frame()
                expected = check_case(shadow, frame, compare_state=False)
                before = _real_state(c) if not expected.ok else None
                env = roundtrip(frame)
                code = env.error.code if env.error else ""
                assert (env.ok, code) == (expected.ok, expected.code), frame
                assert code != ErrorCode.INTERNAL
                if before is not None:
                    failed += 1
                    assert _real_state(c) == before, (code, frame)
            assert failed > 100
            assert c.call(p.Stats()).errors.get(ErrorCode.INTERNAL, 0) == 0
    finally:
        sock.close()
        shadow.close()
        assert d.stop() == 0
    assert "Traceback" not in d.log()
