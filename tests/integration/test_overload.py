"""A bounded load test on loopback: offered four times what the server holds (running batch +
queue), every accepted request completes with the output it gets alone, the rest are refused
with RESOURCE_EXHAUSTED while the accepted ones still run, nothing is lost or hangs, and the
server's memory and bookkeeping are back where they were afterwards."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import grpc
import psutil
import pytest

from loraplex.core.config import ModelConfig
from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, ServerConfig
from loraplex.v1 import inference_pb2 as pb
from tests.helpers import ServerThread

pytestmark = pytest.mark.integration

BATCH, QUEUE = 2, 4
OFFERED = 4 * (BATCH + QUEUE)
PROMPTS = ["The capital of France is", "One, two, three,", "Water is made of", "Monday, Tuesday,"]
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def small_server(model_home, tmp_path_factory):
    config = ServerConfig(
        port=0,
        adapter_store=tmp_path_factory.mktemp("store"),
        # float32 and one kernel for every row count: a request's greedy output must not
        # depend on its batch company, which bf16 and per-row-count kernels do not promise
        # (their rounding differs with the number of rows, and near ties flip).
        model=ModelConfig(home=model_home, dtype="float32"),
        engine=EngineConfig(
            max_batch_size=BATCH, max_queue=QUEUE, max_loras=2, base_kernel="dense"
        ),
    )
    thread = ServerThread(config).start()
    yield thread
    thread.stop()


def request(i: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=PROMPTS[i % len(PROMPTS)], max_new_tokens=NEW_TOKENS)


def offer(client: LoraplexClient) -> list[tuple[int, grpc.StatusCode, str, float]]:
    """Send OFFERED requests at once; (index, code, text, when it ended) of each."""

    def one(i: int) -> tuple[int, grpc.StatusCode, str, float]:
        try:
            text = client.generate(request(i)).text
            return i, grpc.StatusCode.OK, text, time.monotonic()
        except grpc.RpcError as exc:
            return i, exc.code(), exc.details(), time.monotonic()

    with ThreadPoolExecutor(OFFERED) as pool:
        return list(pool.map(one, range(OFFERED)))


def test_overload_is_refused_fast_and_accepted_work_is_correct(small_server):
    process = psutil.Process()
    with LoraplexClient(small_server.address, timeout=300) as client:
        alone = [client.generate(request(i)).text for i in range(len(PROMPTS))]
        rss = []
        for _ in range(3):
            results = offer(client)
            rss.append(process.memory_info().rss)
            codes = [code for _, code, _, _ in results]
            assert set(codes) <= {grpc.StatusCode.OK, grpc.StatusCode.RESOURCE_EXHAUSTED}
            accepted = [r for r in results if r[1] == grpc.StatusCode.OK]
            refused = [r for r in results if r[1] == grpc.StatusCode.RESOURCE_EXHAUSTED]
            # At least a full queue was taken (the batch fills too if the engine admits some
            # before the rest arrive), and the rest refused.
            assert len(accepted) >= QUEUE and refused
            for i, _, text, _ in accepted:
                assert text == alone[i % len(PROMPTS)], (i, text)
            # Refusals came back at once: before the accepted work had finished.
            assert max(t for *_, t in refused) < max(t for *_, t in accepted)
            assert all("retry in" in details for _, _, details, _ in refused)
    state = small_server.state()
    assert state.running == 0 and state.waiting == 0
    assert state.queued_tokens == 0 and small_server.runtime.quotas.in_flight("") == 0
    assert state.kv_rows_used == 0
    # Memory is flat: the second and third rounds allocate nothing that stays.
    assert rss[2] - rss[1] < 64 << 20, [r >> 20 for r in rss]


def test_requests_that_cannot_finish_before_their_deadline_are_refused_not_left_to_expire(
    small_server,
):
    """The client's deadline against the pace measured: a request too long for its deadline,
    and one whose queue is too long for it, end RESOURCE_EXHAUSTED with retry advice, never
    DEADLINE_EXCEEDED after waiting."""
    long = pb.GenerateRequest(prompt=PROMPTS[0], max_new_tokens=64, ignore_eos=True)
    with LoraplexClient(small_server.address, timeout=300) as client:
        start = time.monotonic()
        client.generate(long)
        alone = time.monotonic() - start  # also measures the pace
        client.timeout = alone / 3
        with pytest.raises(grpc.RpcError) as refused:
            client.generate(long)
        assert refused.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "deadline" in refused.value.details() and "retry in" in refused.value.details()
        # Long requests in the batch and the queue, then a short one that would fit alone but
        # not behind them (refused at once, or taken out of the queue before its deadline).
        client.timeout = 300
        with ThreadPoolExecutor(QUEUE) as pool:
            busy = [pool.submit(client.generate, long) for _ in range(QUEUE)]
            time.sleep(alone / 4)
            hurried = LoraplexClient(small_server.address, timeout=1.5 * alone)
            with hurried, pytest.raises(grpc.RpcError) as late:
                hurried.generate(pb.GenerateRequest(prompt=PROMPTS[1], max_new_tokens=8))
            assert late.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, late.value.details()
            assert "deadline" in late.value.details()
            assert all(len(f.result().token_ids) == 64 for f in busy)
