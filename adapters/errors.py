"""Errors the adapter layer raises; the server maps each to one gRPC status code."""


class AdapterError(Exception):
    """Base class for adapter problems a client can act on."""


class AdapterNotFound(AdapterError):
    """No adapter (or version) is registered under that id."""


class InvalidAdapter(AdapterError):
    """The adapter files are malformed or do not fit the base model."""


class InvalidAdapterId(AdapterError):
    """The adapter id is not an identifier (ids are never paths)."""


class AdapterSourceDenied(AdapterError):
    """The source path lies outside every allowed root."""


class StoreConflict(AdapterError):
    """Writers sharing the store kept taking the version number a commit wanted."""
