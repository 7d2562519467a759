"""The runtime: what every protocol front end shares, with no protocol in it (no protobuf, no
grpc, no HTTP). One engine, the adapter tiers, tenancy, admin rights, quotas and telemetry,
behind two services:

    runtime.requests   generate(GenerateInput, request_id, principal) -> Generation
    runtime.adapters   register, push, get, available, delete, pin, unpin, merge, unmerge,
                       merge_state, cache_view (each takes the caller's principal)
    runtime.model_info()

How to write a front end (the gRPC one, grpc_api/, is the example; an HTTP API is next):

1. One module that translates: your request -> `GenerateInput` (or the adapter service's
   arguments), and back: `await generation.complete()` for a whole answer, or iterate over
   the generation for a stream (RequestOutput items: a text delta, token ids, and at the end
   a finish reason and usage); views (views.py) for the adapter service. No logic of its own:
   validation, tenancy, admin rights and limits happen here, the same for every protocol.
2. Callers: authenticate with `auth.KeyRing` (an `authorization: Bearer <key>` value) and
   pass the `Principal` (None without a key file) to every call; refuse a non-admin early on
   the operations the adapter service keeps for admins, if your protocol can. Take the
   caller's request id through `telemetry.request_id(given)` and set `logs.REQUEST_ID` while
   serving, so log lines name it.
3. Errors: every error a client can act on is a `loraplex.core.errors.LoraplexError`; map
   `status_code(exc)` (one table, core/errors.py) to your protocol's status, and anything else
   to an internal error that carries only the request id (log the exception).
   `retry_after(exc)` says when a refused request may be retried.
4. Cancellation: close the generation (`contextlib.aclosing(generation)`) however the call
   ends, even before its first output; that stops the request in the engine and gives back
   what it holds.
5. Wiring: server/app.py builds one Runtime and starts each front end on it (give yours its
   settings in server/config.py, which makes them flags); add your package to the server's
   layers in pyproject.toml's import contracts, and run `make docs`.
"""
