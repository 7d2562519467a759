"""The loraplex server: protocol front ends (gRPC) over a protocol-neutral runtime, over one
engine thread that owns the model.

    cli, app, ray_serve    the process: flags, wiring, scale-out
    grpc_api/              the gRPC front end: translation only (protobuf, status codes, auth)
    runtime/               protocol-neutral: requests, adapters, tenancy, quotas, telemetry
    engine/                the engine thread: scheduling, KV cache, forward, LoRA, sampling
    config, logs, metrics  settings (every field a flag), log output, Prometheus
    client                 a small synchronous gRPC client (the CLI's and the tests')
"""
