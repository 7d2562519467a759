"""The engine: everything that runs on its one thread, which owns the model, the KV cache and
the adapter slots. Scheduling and admission into the running batch (scheduler, fairness,
batch), the forward over a flat token batch (model_runner, forward, kv_cache), the device slot
table and the loads into it (slots, slot_loader), the mixed-adapter LoRA math (lora,
lora_ops), sampling and output processing, and merge control (merging). Other threads reach it
only through Engine's thread-safe methods and the snapshots in state.py. No asyncio, no
protocol."""
