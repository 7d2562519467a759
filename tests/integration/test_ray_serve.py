"""loraplex on Ray Serve: two engine replicas behind Ray's gRPC proxy, a stock loraplex client,
eight adapters in a shared store. Requests are routed by adapter: each adapter's requests land
on the replica that loaded it, so replicas load far fewer adapters than they serve requests."""

from __future__ import annotations

from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor

import grpc
import pytest

from loraplex.server.client import LoraplexClient
from loraplex.server.config import EngineConfig, ModelConfig, ServerConfig
from loraplex.v1 import adapters_pb2
from loraplex.v1 import inference_pb2 as pb

ray = pytest.importorskip("ray", reason="Ray Serve is a dev dependency")
pytestmark = pytest.mark.integration

PORT = 9613


@pytest.fixture(scope="module")
def cluster(model_home, adapter_root, tmp_path_factory, peft_reference):
    import ray
    from ray import serve
    from ray.serve.config import gRPCOptions

    from loraplex.server.ray_serve import SERVICER_FUNCTIONS, build_app

    config = ServerConfig(
        adapter_roots=(adapter_root,),
        adapter_store=tmp_path_factory.mktemp("shared-store"),
        model=ModelConfig(home=model_home),
        engine=EngineConfig(max_loras=4, max_batch_size=8),
    )
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    serve.start(grpc_options=gRPCOptions(port=PORT, grpc_servicer_functions=SERVICER_FUNCTIONS))
    serve.run(build_app(config, replicas=2), name="loraplex")
    yield f"localhost:{PORT}"
    serve.shutdown()
    ray.shutdown()


def generate(client: LoraplexClient, adapter_id: str) -> tuple[pb.GenerateResponse, dict]:
    request = pb.GenerateRequest(adapter_id=adapter_id, prompt="Hello", max_new_tokens=3)
    response, call = client.inference.Generate.with_call(request, timeout=120)
    return response, dict(call.trailing_metadata())


def test_a_stock_client_is_routed_by_adapter(cluster, peft_reference):
    from loraplex.server.ray_serve import LOADS_METADATA, REPLICA_METADATA

    _, _, dirs = peft_reference
    names = [f"tenant-adapter-{i}" for i in range(8)]
    sources = list(dirs.values())
    with LoraplexClient(cluster, timeout=120) as client:
        assert client.model_info().model_id  # an unchanged client, through the proxy
        for i, name in enumerate(names):  # registered through whichever replica
            assert client.register(name, str(sources[i % len(sources)])).adapter.version == 1
        with pytest.raises(grpc.RpcError) as err:
            client.get("never-registered")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND  # the replica's own status
        for name in names:  # first request of each adapter: a replica loads it
            generate(client, name)
        work = [name for name in names for _ in range(5)]
        with ThreadPoolExecutor(8) as pool:
            replies = list(pool.map(lambda n: (n, *generate(client, n)), work))
        request = pb.GenerateRequest(adapter_id=names[0], prompt="Hi", max_new_tokens=3)
        stream = list(client.generate_stream(request))
        assert stream[-1].finish_reason and stream[-1].adapter_id == names[0]
    where: dict[str, Counter[str]] = defaultdict(Counter)
    loads: dict[str, int] = {}
    for name, response, trailing in replies:
        assert response.adapter_id == name and response.usage.completion_tokens >= 1
        replica = trailing[REPLICA_METADATA]
        where[name][replica] += 1
        loads[replica] = max(loads.get(replica, 0), int(trailing[LOADS_METADATA]))
    assert len(loads) == 2, f"only one replica served: {dict(where)}"
    # Affinity: each adapter's requests land (mostly) on one replica...
    for name, counts in where.items():
        assert counts.most_common(1)[0][1] >= 4, (name, dict(counts))
    # ...so the replicas loaded far fewer adapters than they served requests.
    assert sum(loads.values()) <= 12 < len(work), loads


def test_new_versions_and_deletes_reach_every_replica(cluster, peft_reference):
    """Once a registration or delete is answered, no replica shows the old state. ListAdapters
    names no adapter, so Ray spreads it over both replicas."""
    from loraplex.server.ray_serve import REPLICA_METADATA

    _, _, dirs = peft_reference

    def listings(client: LoraplexClient) -> list[tuple[dict[str, int], str]]:
        found = []
        for _ in range(16):
            reply, call = client.adapters.ListAdapters.with_call(
                adapters_pb2.ListAdaptersRequest(), timeout=60
            )
            replica = dict(call.trailing_metadata())[REPLICA_METADATA]
            found.append(({a.adapter_id: a.version for a in reply.adapters}, replica))
        return found

    with LoraplexClient(cluster, timeout=120) as client:
        for version, source in enumerate(dirs.values(), start=1):
            assert client.register("moving", str(source)).adapter.version == version
            seen = listings(client)
            assert {held.get("moving") for held, _ in seen} == {version}
            assert len({replica for _, replica in seen}) == 2  # both replicas were asked
            assert generate(client, "moving")[0].adapter_version == version
        client.delete("moving")
        assert all("moving" not in held for held, _ in listings(client))
        with pytest.raises(grpc.RpcError) as err:
            generate(client, "moving")
        assert err.value.code() == grpc.StatusCode.NOT_FOUND
