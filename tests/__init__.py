"""The tests mirror the code: tests/core, tests/adapters, tests/server/{engine,runtime,grpc_api}
and tests/training are unit tests on a tiny random Llama (seconds); tests/deploy checks deploy/.
tests/integration (marker `integration`) serves the embedded SmolLM2 in this process, one server
shared by the session unless a test needs its own; tests/e2e (marker `e2e`) runs other
processes: `loraplex` commands, Ray clusters, torchrun. `make test` runs them all."""
