"""phi3-lora: fine-tune Phi-3 with LoRA or 4-bit QLoRA in one readable Accelerate loop.

The modules, one concern each: ``config`` (the recipe), ``data`` and ``formats`` (chat rows to
token ids and label masks, packing), ``model`` and ``quant`` (the base), ``lora`` (adapters),
``loss``, ``optim``, ``loop`` (the Trainer), ``checkpoint`` (adapter state, resuming),
``metrics`` (TensorBoard, summary, MFU), ``preemption`` (the signals that stop a run cleanly).
``scripts/train.py`` is the entry point.
"""
