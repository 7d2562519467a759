"""Adapters: the registry and blob store, validation against the base model, the device slot
table and the LoRA math that serves many adapters in one batch."""
