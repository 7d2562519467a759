"""The runtime: what every protocol front end shares, with no protocol in it (no protobuf, no
grpc, no HTTP). One engine, the adapter tiers, tenancy, quotas and telemetry, behind two
services:

    runtime.requests   generate(GenerateInput, request_id, principal) -> Generation
    runtime.adapters   register, push, get, available, delete, pin, unpin, merge, unmerge,
                       merge_state, cache_view
    runtime.model_info()

How to write a front end (the gRPC one, grpc_api/, is the example; an HTTP API is next):

1. One module that translates: your request -> `GenerateInput` (or the adapter service's
   arguments), and `Generation.outputs` (RequestOutput items: a text delta, token ids, and at
   the end a finish reason and usage) or a view (views.py) -> your response. No logic of its
   own: validation, tenancy and limits happen here, the same for every protocol.
2. Errors: every error a client can act on is a `loraplex.core.errors.LoraplexError`; map
   `status_code(exc)` (one table, core/errors.py) to your protocol's status, and anything else
   to an internal error carrying only the request id (log the exception). `retry_after(exc)`
   says when a refused request may be retried.
3. Callers: authenticate with `auth.KeyRing` and pass the `Principal` (None without keys);
   tenancy is checked from it. Set `logs.REQUEST_ID` while serving a call, so log lines name it.
4. Cancellation: close `Generation.outputs` (`contextlib.aclosing`) however the call ends; that
   stops the request in the engine and gives back what it holds.
5. Wiring: the process (server/app.py) builds one Runtime and starts each front end on it.
"""
