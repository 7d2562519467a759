"""The loraplex server: gRPC services in front of one engine thread that owns the model."""

__version__ = "0.1.0"
