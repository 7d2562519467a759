"""The bottom layer, shared by the server, the adapter tiers and training: the domain types
(adapters and their versions), the domain errors and their canonical status codes, the base
model (its configuration and how it is loaded), and command-line options made from config
dataclasses. It imports nothing else of loraplex, and neither grpc nor protobuf."""

__version__ = "0.1.0"
