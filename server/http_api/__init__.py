"""The OpenAI-compatible HTTP front end (Starlette on uvicorn, on the gRPC server's event loop):
the same runtime, keys, tenancy, admission and metrics as gRPC, in OpenAI's request and
response shapes and, where OpenAI is silent, vLLM's."""
