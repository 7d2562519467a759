"""The OpenAI-compatible HTTP API as OpenAI's own client sees it, on the shared server: models,
chat and completions on the base and on adapters (equal to gRPC's answers), streams, errors,
disconnects, vLLM's load/unload endpoints, and the HTTP metrics."""

from __future__ import annotations

import asyncio
import http.client
import json
import socket
import time
import urllib.error
import urllib.request

import openai
import pytest
from prometheus_client import generate_latest

from loraplex.v1 import inference_pb2 as pb

pytestmark = pytest.mark.integration

QUESTION = "Name three colours of the rainbow."


@pytest.fixture(scope="module")
def api(server, registered):
    return openai.OpenAI(base_url=server.http_url, api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def base_id(server):
    return server.runtime.info.model_id


def raw(server, method: str, path: str, body: object = None, headers: dict | None = None):
    """(status, headers, body bytes) of one plain HTTP call."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=120)
    data = json.dumps(body).encode() if body is not None else None
    conn.request(
        method, path, body=data, headers={"content-type": "application/json", **(headers or {})}
    )
    response = conn.getresponse()
    result = response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    conn.close()
    return result


def metric(server, name: str, **labels: str) -> float:
    text = generate_latest(server.server.metrics.registry).decode()
    total = 0.0
    for line in text.splitlines():
        if line.startswith(name) and all(f'{k}="{v}"' in line for k, v in labels.items()):
            head = line.split(" ")[0]
            if head == name or head.startswith(name + "{"):
                total += float(line.rsplit(" ", 1)[1])
    return total


def test_models_lists_the_base_and_every_adapter(api, base_id, registered):
    models = {m.id: m for m in api.models.list().data}
    assert set(models) == {base_id, *registered}
    assert models[base_id].parent is None
    for name in registered:
        assert models[name].parent == base_id
        assert models[name].owned_by == "loraplex"  # no tenants without keys
        assert models[name].created > 1_600_000_000
    one = api.models.retrieve("attn-r8")
    assert one.id == "attn-r8" and one.parent == base_id
    with pytest.raises(openai.NotFoundError):
        api.models.retrieve("no-such-adapter")


@pytest.mark.parametrize("adapter", ["", "all-r16"])
def test_chat_over_http_equals_grpc(api, client, base_id, adapter):
    http_answer = api.chat.completions.create(
        model=adapter or base_id,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=24,
        temperature=0,
    )
    grpc_answer = client.generate(
        pb.GenerateRequest(
            adapter_id=adapter,
            messages=[pb.ChatMessage(role="user", content=QUESTION)],
            max_new_tokens=24,
        )
    )
    choice = http_answer.choices[0]
    assert choice.message.content == grpc_answer.text
    assert choice.message.role == "assistant"
    assert choice.finish_reason == grpc_answer.finish_reason
    assert http_answer.model == (adapter or base_id)
    assert http_answer.usage.prompt_tokens == grpc_answer.usage.prompt_tokens
    assert http_answer.usage.completion_tokens == grpc_answer.usage.completion_tokens
    assert http_answer.usage.total_tokens == grpc_answer.usage.total_tokens
    assert http_answer.system_fingerprint.startswith("fp_")
    if adapter:  # the adapter version that served is in the fingerprint
        assert http_answer.system_fingerprint.endswith(f"{adapter}.v{grpc_answer.adapter_version}")


def test_completions_take_text_token_ids_and_lists(server, api, client):
    prompt = "The capital of France is"
    tokens = api.completions.create(
        model="mix-r32", prompt=prompt, max_tokens=12, temperature=0
    ).choices[0]
    grpc_text = client.generate(
        pb.GenerateRequest(adapter_id="mix-r32", prompt=prompt, max_new_tokens=12)
    ).text
    assert tokens.text == grpc_text
    ids = server.runtime.info.tokenizer(prompt, split_special_tokens=True).input_ids
    by_ids = api.completions.create(model="mix-r32", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == grpc_text
    assert by_ids.usage.prompt_tokens == len(ids)
    batch = api.completions.create(
        model="mix-r32", prompt=[prompt, ids], max_tokens=12, temperature=0
    )
    assert [c.index for c in batch.choices] == [0, 1]
    assert all(c.text and c.finish_reason == "length" for c in batch.choices)
    assert batch.usage.completion_tokens == 24
    assert batch.usage.prompt_tokens == 2 * len(ids)
    assert batch.usage.prompt_tokens == 2 * len(ids)


def test_stream_concatenates_to_the_unary_text_and_ends_with_usage(api):
    kwargs = dict(
        model="attn-r8", messages=[{"role": "user", "content": QUESTION}], max_tokens=32,
        temperature=0,
    )  # fmt: skip
    unary = api.chat.completions.create(**kwargs)
    chunks = list(
        api.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == unary.choices[0].message.content
    assert len(chunks) > 5, "the stream should deliver text as it is generated"
    finishing = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishing[-1] == unary.choices[0].finish_reason
    assert all(f is None for f in finishing[:-1])
    assert chunks[-1].choices == [] and chunks[-1].usage == unary.usage
    assert all(c.usage is None for c in chunks[:-1])


def test_async_client_streams_completions(server, base_id):
    async def run() -> tuple[str, str]:
        api = openai.AsyncOpenAI(base_url=server.http_url, api_key="unused", max_retries=0)
        kwargs = dict(model=base_id, prompt="Once upon a time", max_tokens=16, temperature=0)
        unary = await api.completions.create(**kwargs)
        stream = await api.completions.create(**kwargs, stream=True)
        text = "".join([c.choices[0].text async for c in stream])
        await api.close()
        return unary.choices[0].text, text

    unary, streamed = asyncio.run(run())
    assert streamed == unary and unary


def test_stream_ends_with_done_as_server_sent_events(server, base_id):
    status, headers, body = raw(
        server, "POST", "/v1/completions",
        {"model": base_id, "prompt": "Hello", "max_tokens": 4, "stream": True},
    )  # fmt: skip
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = [e for e in body.decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": "high"}, "top_p"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_completion_tokens": 10**6}, "max_tokens"),
        ({"stop": 3}, "stop"),
        ({"n": 17}, "n"),
        ({"top_logprobs": 3}, "top_logprobs"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "x"}]}]}, "messages[0].content[0]"),
    ],
)  # fmt: skip
def test_bad_requests_are_400_naming_the_parameter(server, base_id, body, param):
    request = {"model": base_id, "messages": [{"role": "user", "content": "hi"}], **body}
    status, headers, answer = raw(server, "POST", "/v1/chat/completions", request)
    assert status == 400
    error = json.loads(answer)["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param
    assert headers["x-request-id"]


def test_unknown_model_is_404_and_every_answer_has_a_request_id(server):
    body = {"model": "nobody-has-this", "messages": [{"role": "user", "content": "hi"}]}
    status, headers, answer = raw(
        server, "POST", "/v1/chat/completions", body, {"x-request-id": "my-request-42"}
    )
    assert status == 404 and headers["x-request-id"] == "my-request-42"
    assert json.loads(answer)["error"]["code"] == "model_not_found"
    status, headers, answer = raw(server, "GET", "/v1/nothing-here")
    assert status == 404 and headers["x-request-id"] and "error" in json.loads(answer)
    status, headers, _ = raw(server, "POST", "/v1/completions", None)  # no body
    assert status == 400 and headers["x-request-id"]
    conn = http.client.HTTPConnection("127.0.0.1", server.server.http_port, timeout=60)
    conn.request("POST", "/v1/completions", body=b"[" * 100_000)  # nested past Python's stack
    assert conn.getresponse().status == 400


def test_probes(server):
    assert raw(server, "GET", "/health")[0] == 200
    assert raw(server, "GET", "/ready")[0] == 200


def running(server) -> float:
    return metric(server, "loraplex_num_requests_running")


def wait_idle(server, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while running(server) and time.monotonic() < deadline:
        time.sleep(0.05)


def send(server, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", server.server.http_port))
    sock.sendall(
        b"POST /v1/completions HTTP/1.1\r\nhost: test\r\ncontent-type: application/json\r\n"
        + f"content-length: {len(data)}\r\n\r\n".encode()
        + data
    )
    return sock


@pytest.mark.parametrize("stream", [True, False])
def test_a_dropped_connection_frees_its_sequence(server, registered, stream):
    wait_idle(server)
    cancelled = metric(server, "loraplex_requests_total", code="CANCELLED", protocol="http")
    body = {"model": "attn-r8", "prompt": "Count:", "max_tokens": 4000, "ignore_eos": True,
            "stream": stream}  # fmt: skip
    sock = send(server, body)
    deadline = time.monotonic() + 60
    while not running(server):
        assert time.monotonic() < deadline, "the request never ran"
        time.sleep(0.02)
    if stream:
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
    sock.close()
    deadline = time.monotonic() + 60
    while running(server):
        assert time.monotonic() < deadline, "the dropped request kept running"
        time.sleep(0.05)
    # Ended by the disconnect, not run to its 4000 tokens (that would count as OK).
    deadline = time.monotonic() + 5
    while metric(server, "loraplex_requests_total", code="CANCELLED", protocol="http") == cancelled:
        assert time.monotonic() < deadline, "the dropped request was not cancelled"
        time.sleep(0.05)


def test_load_and_unload_lora_adapter_as_vllm(server, api, peft_reference, adapter_root):
    import shutil

    _, _, dirs = peft_reference
    path = adapter_root / "http-loaded"
    shutil.copytree(dirs["attn-r8"], path, dirs_exist_ok=True)
    status, _, answer = raw(
        server,
        "POST",
        "/v1/load_lora_adapter",
        {"lora_name": "http-loaded", "lora_path": str(path), "tenant": "acme", "shared": True},
    )
    assert status == 200, answer
    assert {m.id: m.owned_by for m in api.models.list().data}["http-loaded"] == "acme"
    chat = api.chat.completions.create(
        model="http-loaded", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
        temperature=0,
    )  # fmt: skip
    same = api.chat.completions.create(
        model="attn-r8", messages=[{"role": "user", "content": QUESTION}], max_tokens=8,
        temperature=0,
    )  # fmt: skip
    assert chat.choices[0].message.content == same.choices[0].message.content
    status, _, answer = raw(server, "POST", "/v1/unload_lora_adapter", {"lora_name": "http-loaded"})
    assert status == 200, answer
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(
            model="http-loaded", messages=[{"role": "user", "content": "x"}]
        )
    status, _, answer = raw(server, "POST", "/v1/load_lora_adapter", {"lora_name": "x"})
    assert status == 400 and json.loads(answer)["error"]["param"] == "lora_path"


def test_http_calls_are_counted(server, api, base_id):
    route = {"method": "POST", "route": "/v1/chat/completions"}
    before = metric(server, "http_server_handled_total", code="200", **route)
    requests_before = metric(server, "loraplex_requests_total", code="OK", protocol="http")
    api.chat.completions.create(
        model=base_id, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert metric(server, "http_server_handled_total", code="200", **route) == before + 1
    assert metric(server, "http_server_started_total", **route) >= before + 1
    assert (
        metric(server, "loraplex_requests_total", code="OK", protocol="http") == requests_before + 1
    )
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(server.http_url + "/nothing")
    assert metric(server, "http_server_handled_total", route="other", code="404") >= 1
