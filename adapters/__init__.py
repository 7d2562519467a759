"""Host-side adapter management: where adapters live and how they get in and out. The store
(manifests over content-addressed blobs, local or S3) and its sources (a path, a URI, an
upload), validation against the base model, registration, the host-memory cache tier,
composition of several adapters into one, and export of one merged into the base. Runs on
worker threads and the event loop; the torch math of a composition is handed to the engine
thread by the caller. Imports only loraplex.core."""
