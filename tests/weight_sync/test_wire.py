"""The one error codec and the message codec, through real msgpack bytes (each transport's error reply)."""

import re

import msgpack
import pytest

from rollserve.serve import protocol
from rollserve.weight_sync import WeightUpdateError
from rollserve.weight_sync.messages import REPLIES, SHM_REQUESTS, Refused, ShmCommit
from rollserve.weight_sync.wire import RemoteError, failure, remote_error

WHERE = "engine at tcp://127.0.0.1:5555"
TRANSPORTS = [(REPLIES, Refused, {}), (protocol.REPLIES, protocol.Error, {"id": 7})]


class RefusedByPolicy(PermissionError):
    pass


def round_trip(exc, codec, reply, fields):
    """`exc` as that transport's error reply, encoded, decoded and raised as the sender raises it."""
    decoded = codec.decode(codec.encode(failure(exc, reply, **fields)))
    assert isinstance(decoded, reply) and all(getattr(decoded, k) == v for k, v in fields.items())
    return remote_error(decoded, WHERE)


@pytest.mark.parametrize("codec,reply,fields", TRANSPORTS)
def test_weight_update_error_round_trips_with_its_problems(codec, reply, fields):
    problems = {"non-finite values (NaN/inf)": ["lm_head.weight"], "unknown names": ["a.b", "c.d"]}
    raised = round_trip(WeightUpdateError(problems), codec, reply, fields)
    assert type(raised) is WeightUpdateError and raised.problems == problems
    assert str(raised) == f"{WHERE}: {WeightUpdateError(problems)}"


@pytest.mark.parametrize("codec,reply,fields", TRANSPORTS)
@pytest.mark.parametrize("kind", [ValueError, TypeError, PermissionError, TimeoutError, NotImplementedError])
def test_each_kind_round_trips_and_says_where_it_came_from(codec, reply, fields, kind):
    raised = round_trip(kind("top_p=2.0 is invalid"), codec, reply, fields)
    assert type(raised) is kind
    assert str(raised) == f"{WHERE}: {kind.__name__}: top_p=2.0 is invalid"


@pytest.mark.parametrize("codec,reply,fields", TRANSPORTS)
def test_a_subclass_is_raised_as_its_nearest_kind_naming_the_remote_type(codec, reply, fields):
    raised = round_trip(RefusedByPolicy("not today"), codec, reply, fields)
    assert type(raised) is PermissionError and str(raised) == f"{WHERE}: RefusedByPolicy: not today"


@pytest.mark.parametrize("codec,reply,fields", TRANSPORTS)
@pytest.mark.parametrize("exc", [KeyError("model.norm.weight"), RuntimeError("CUDA out of memory"), OSError(28, "full")])
def test_any_other_exception_is_a_remote_error_naming_the_remote_type(codec, reply, fields, exc):
    raised = round_trip(exc, codec, reply, fields)
    assert type(raised) is RemoteError and isinstance(raised, RuntimeError)
    assert str(raised) == f"{WHERE}: {type(exc).__name__}: {exc}"


def test_a_weight_update_error_reply_without_problems_is_a_value_error():
    raised = remote_error(Refused(error="WeightUpdateError", kind="WeightUpdateError", message="bad"), WHERE)
    assert type(raised) is ValueError and str(raised) == f"{WHERE}: WeightUpdateError: bad"


def test_the_message_codec_names_the_known_kinds_and_the_bad_field():
    assert isinstance(SHM_REQUESTS.decode(msgpack.packb({"op": "commit", "pid": 1, "sync": 0, "buckets": 0})),
                      ShmCommit)
    cases = [(b"\xc1", "malformed weight-sync message: the header is not msgpack"),
             (msgpack.packb([1, 2]), "must be a map with a string 'op'"),
             (msgpack.packb({"op": "nope", "pid": 1}),
              "unknown weight-sync message op 'nope'; known: ['abort', 'bucket', 'commit', 'evict', 'hello']"),
             (msgpack.packb({"op": "commit", "pid": 1, "sync": 0, "buckets": "2"}),
              "malformed 'commit' weight-sync message: Expected `int`, got `str` - at `$.buckets`"),
             (msgpack.packb({"op": "commit", "sync": 0, "buckets": 2}), "missing required field `pid`")]
    for raw, expected in cases:
        with pytest.raises(ValueError, match=re.escape(expected)):
            SHM_REQUESTS.decode(raw)
