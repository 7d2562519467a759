"""Training: turns a tenant's dataset into a PEFT LoRA adapter that the server serves as is."""
