"""The tests mirror the code: tests/core, tests/adapters, tests/server/{engine,runtime,grpc_api}
and tests/training are unit tests on a tiny random Llama (seconds); tests/deploy checks deploy/.
tests/integration (marker `integration`) serves in this process: one server on the embedded
SmolLM2 shared by the session, unless a test needs its own (clients may be other processes: the
CLI, Prometheus). tests/e2e (marker `e2e`) runs servers in processes of their own: `loraplex
serve` and `serve-ray` subprocesses, Ray clusters, torchrun. `make test` runs them all."""
