"""Property-based fuzzing of generate requests through the server: whatever a client sends,
the answer is a result or a documented status code, never an internal error or a crash."""

from __future__ import annotations

import grpc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraplex.v1 import inference_pb2 as pb

pytestmark = pytest.mark.integration

DOCUMENTED = {
    grpc.StatusCode.OK,
    grpc.StatusCode.INVALID_ARGUMENT,
    grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.RESOURCE_EXHAUSTED,
}
SPECIAL = ["<|im_start|>", "<|im_end|>", "<|endoftext|>", "\x00", "\ud7ff", "é", "🙂"]
FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)

texts = st.text(max_size=120) | st.sampled_from(SPECIAL) | st.just("")
messages = st.lists(
    st.builds(
        pb.ChatMessage,
        role=st.sampled_from(["system", "user", "assistant", "tool", "", "root"]),
        content=texts,
    ),
    max_size=4,
)
# Few new tokens (or far too many): the server really generates what is asked for.
max_new_tokens = st.none() | st.integers(-3, 4) | st.integers(8_000, 2**31 - 1)
floats = st.floats(width=32, allow_nan=True, allow_infinity=True)


@st.composite
def requests(draw: st.DrawFn) -> pb.GenerateRequest:
    request = pb.GenerateRequest(
        adapter_id=draw(st.sampled_from(["", "no-such-adapter", "../etc", "UPPER", "a" * 80])),
        temperature=draw(floats),
        top_k=draw(st.integers(-(2**31), 2**31 - 1)),
        stop=draw(st.lists(st.text(max_size=40) | st.just("x" * 300), max_size=20)),
    )
    if draw(st.booleans()):
        request.prompt = draw(texts)
    else:
        request.messages.extend(draw(messages))
    n = draw(max_new_tokens)
    request.max_new_tokens = 2 if n is None else n  # unset means the 128-token default
    if (top_p := draw(st.none() | floats)) is not None:
        request.top_p = top_p
    if (seed := draw(st.none() | st.integers(0, 2**64 - 1))) is not None:
        request.seed = seed
    return request


def outcome(call) -> grpc.StatusCode:
    try:
        call()
    except grpc.RpcError as exc:
        assert exc.code() in DOCUMENTED, (exc.code(), exc.details())
        assert "Traceback" not in (exc.details() or "")
        return exc.code()
    return grpc.StatusCode.OK


@FUZZ
@given(request=requests(), stream=st.booleans())
def test_fuzzed_requests_get_documented_codes(client, request, stream):
    if stream:
        code = outcome(lambda: list(client.generate_stream(request)))
    else:
        code = outcome(lambda: client.generate(request))
    if code == grpc.StatusCode.OK:  # then it was valid: its own limits held
        assert 1 <= request.max_new_tokens <= 4


@FUZZ
@given(raw=st.binary(max_size=80))
def test_fuzzed_bytes_get_documented_codes(server, raw):
    """Arbitrary bytes as a GenerateRequest (with max_new_tokens=2 appended, which wins when
    the rest parses): malformed messages are INVALID_ARGUMENT, not an internal error."""
    with grpc.insecure_channel(server.address) as channel:
        generate = channel.unary_unary(
            "/loraplex.v1.Inference/Generate",
            request_serializer=lambda x: x,
            response_deserializer=lambda x: x,
        )
        outcome(lambda: generate(raw + b"\x20\x02", timeout=120))
