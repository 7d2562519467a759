"""A small synchronous client for the loraplex gRPC API (used by the CLI and tests)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import grpc

from loraplex.adapters.entries import STAGED_FILES
from loraplex.v1 import adapters_pb2, adapters_pb2_grpc, inference_pb2, inference_pb2_grpc

PUSH_CHUNK_BYTES = 1 << 20


def push_requests(
    adapter_id: str, directory: Path, pin: bool = False, tenant: str = "", shared: bool = False
) -> Iterator[adapters_pb2.PushAdapterRequest]:
    """A PushAdapter stream: the files of `directory` the server reads in 1 MiB pieces, and the
    name alone of every other entry (a subdirectory's with a trailing "/"): the server decides
    (it ignores most, refuses pickled weights) and says which it ignored, and tokenizer files
    or optimizer state are never read here nor sent."""
    yield adapters_pb2.PushAdapterRequest(
        adapter_id=adapter_id, pin=pin, tenant=tenant, shared=shared
    )
    for path in sorted(directory.iterdir()):
        if path.name not in STAGED_FILES or not path.is_file():
            # A name that is not UTF-8 (protobuf strings are) goes with its bytes escaped.
            name = os.fsencode(path.name).decode("utf-8", "backslashreplace")
            yield adapters_pb2.PushAdapterRequest(file_name=name + ("/" if path.is_dir() else ""))
            continue
        with open(path, "rb") as f:
            while chunk := f.read(PUSH_CHUNK_BYTES):
                yield adapters_pb2.PushAdapterRequest(file_name=path.name, data=chunk)
            if path.stat().st_size == 0:
                yield adapters_pb2.PushAdapterRequest(file_name=path.name)


class LoraplexClient:
    def __init__(
        self,
        address: str,
        timeout: float | None = None,
        api_key: str | None = None,
        tls_ca: Path | None = None,
    ) -> None:
        """`api_key` is sent as `authorization: Bearer <key>`; `tls_ca` (a PEM bundle) turns on
        TLS and verifies the server against it."""
        if tls_ca is None:
            self.channel = grpc.insecure_channel(address)
        else:
            credentials = grpc.ssl_channel_credentials(root_certificates=tls_ca.read_bytes())
            self.channel = grpc.secure_channel(address, credentials)
        self.metadata = (("authorization", f"Bearer {api_key}"),) if api_key else None
        self.inference = inference_pb2_grpc.InferenceStub(self.channel)
        self.adapters = adapters_pb2_grpc.AdaptersStub(self.channel)
        self.timeout = timeout

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> LoraplexClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def generate(self, request: inference_pb2.GenerateRequest) -> inference_pb2.GenerateResponse:
        return self.inference.Generate(request, timeout=self.timeout, metadata=self.metadata)

    def generate_stream(
        self, request: inference_pb2.GenerateRequest
    ) -> Iterator[inference_pb2.GenerateResponse]:
        return self.inference.GenerateStream(request, timeout=self.timeout, metadata=self.metadata)

    def model_info(self) -> inference_pb2.ModelInfoResponse:
        return self.inference.ModelInfo(
            inference_pb2.ModelInfoRequest(), timeout=self.timeout, metadata=self.metadata
        )

    def register(
        self, adapter_id: str, path: str, pin: bool = False, tenant: str = "", shared: bool = False
    ) -> adapters_pb2.RegisterAdapterResponse:
        """Register `path` as `adapter_id`, owned by `tenant` (default: the caller's)."""
        request = adapters_pb2.RegisterAdapterRequest(
            adapter_id=adapter_id, path=path, pin=pin, tenant=tenant, shared=shared
        )
        return self.adapters.RegisterAdapter(request, timeout=self.timeout, metadata=self.metadata)

    def push(
        self,
        adapter_id: str,
        directory: Path,
        pin: bool = False,
        tenant: str = "",
        shared: bool = False,
    ) -> adapters_pb2.RegisterAdapterResponse:
        """Upload a local adapter directory to the server (which may be remote)."""
        return self.adapters.PushAdapter(
            push_requests(adapter_id, directory, pin, tenant, shared),
            timeout=self.timeout,
            metadata=self.metadata,
        )

    def pin(self, adapter_id: str) -> adapters_pb2.AdapterInfo:
        request = adapters_pb2.PinAdapterRequest(adapter_id=adapter_id)
        return self.adapters.PinAdapter(request, timeout=self.timeout, metadata=self.metadata)

    def unpin(self, adapter_id: str) -> adapters_pb2.AdapterInfo:
        request = adapters_pb2.PinAdapterRequest(adapter_id=adapter_id)
        return self.adapters.UnpinAdapter(request, timeout=self.timeout, metadata=self.metadata)

    def cache_stats(self) -> adapters_pb2.CacheStats:
        return self.adapters.GetCacheStats(
            adapters_pb2.GetCacheStatsRequest(), timeout=self.timeout, metadata=self.metadata
        )

    def get(self, adapter_id: str) -> adapters_pb2.AdapterInfo:
        request = adapters_pb2.GetAdapterRequest(adapter_id=adapter_id)
        return self.adapters.GetAdapter(request, timeout=self.timeout, metadata=self.metadata)

    def list(self) -> list[adapters_pb2.AdapterInfo]:
        response = self.adapters.ListAdapters(
            adapters_pb2.ListAdaptersRequest(), timeout=self.timeout, metadata=self.metadata
        )
        return list(response.adapters)

    def merge(self, adapter_id: str) -> adapters_pb2.MergeState:
        """Fold `adapter_id` into the base and keep it there until `unmerge`."""
        request = adapters_pb2.MergeAdapterRequest(adapter_id=adapter_id)
        return self.adapters.MergeAdapter(request, timeout=self.timeout, metadata=self.metadata)

    def unmerge(self) -> adapters_pb2.MergeState:
        return self.adapters.UnmergeAdapter(
            adapters_pb2.UnmergeAdapterRequest(), timeout=self.timeout, metadata=self.metadata
        )

    def merge_state(self) -> adapters_pb2.MergeState:
        return self.adapters.GetMergeState(
            adapters_pb2.GetMergeStateRequest(), timeout=self.timeout, metadata=self.metadata
        )

    def delete(self, adapter_id: str) -> adapters_pb2.DeleteAdapterResponse:
        request = adapters_pb2.DeleteAdapterRequest(adapter_id=adapter_id)
        return self.adapters.DeleteAdapter(request, timeout=self.timeout, metadata=self.metadata)
