"""Fine-tuning ChatGLM-6B on your own data: LoRA adapters and P-Tuning v2 prefixes.

- ``lora``: LoRA layers, PEFT-compatible adapter files, merging.
- ``data``: reading the jsonl formats people already have (official ptuning, alpaca, chat).
- ``ptuning``: adding, training and saving a P-Tuning v2 prefix encoder (official format).
- ``forward``: the training forward (prefix-LM mask, official positions, loss on answers).
- ``train``: the training loop (checkpointing, accumulation, schedule, resume, evaluation).
"""
