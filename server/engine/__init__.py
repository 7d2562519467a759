"""The engine: one thread owns the model, the KV cache and the adapter slots, and runs
continuous steps of prefill and decode over a batch of sequences for many adapters."""
