"""The gRPC front end (`loraplex.v1`): it only translates. Requests become runtime calls
(convert.py), runtime answers become messages, domain errors become status codes (status.py);
the interceptors authenticate and decode every call before a servicer sees it, and count it.
server.py puts the services, health and reflection on a grpc.aio server."""
