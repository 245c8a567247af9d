"""Adapter files on disk: collect the adapter state_dict, and write directories atomically.

Only adapter tensors are saved (a few MB, not the base model). Under ZeRO-3 each parameter is
partitioned across processes, so collecting the adapter gathers the trainable parameters —
only those, never the frozen base — and every process must take part (it is a collective);
only the main process writes. A directory is written under a temporary name, fsynced and
renamed into place, so a reader sees a complete adapter or none.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from pathlib import Path

import torch


def adapter_state_dict(model) -> dict[str, torch.Tensor]:
    """Full-shape CPU copies of the trainable (adapter) parameters, keyed by their names in ``model``.

    ``model`` is the unwrapped peft model (``accelerator.unwrap_model``): names taken through a DDP
    or DeepSpeed wrapper carry a ``module.`` prefix that peft's saver silently filters away.
    Call on every process: under ZeRO-3 the parameters are gathered, which is a collective.
    """
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    gather = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for _, p in named):
        import deepspeed
        gather = deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=None)
    with gather:
        state = {name: p.detach().to("cpu", copy=True).contiguous() for name, p in named}
    empty = [name for name, t in state.items() if t.numel() == 0]
    if not state or empty:
        raise RuntimeError(f"adapter state_dict is empty or has empty tensors ({empty[:3]}): "
                           "ZeRO-3 parameters were not gathered")
    return state


def _fsync_tree(root: Path) -> None:
    for path in sorted(root.rglob("*")):
        if path.is_file():
            with path.open("rb") as f:
                os.fsync(f.fileno())
    fd = os.open(root, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_directory(target: str | Path):
    """Yield a temporary directory beside ``target``; on success fsync it and rename it to ``target``.

    An existing ``target`` is replaced only after the new one is complete. On an error the
    temporary directory is removed and ``target`` is left as it was.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if target.exists():
            old = target.parent / f".{target.name}.old-{os.getpid()}"
            target.rename(old)
        tmp.rename(target)
        if old is not None:
            shutil.rmtree(old)
        fd = os.open(target.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_peft_adapter(peft_model, state_dict: dict[str, torch.Tensor], target: str | Path) -> Path:
    """Write ``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) atomically."""
    from safetensors import safe_open

    with atomic_directory(target) as tmp:
        peft_model.save_pretrained(tmp, state_dict=state_dict, safe_serialization=True)
        with safe_open(str(tmp / "adapter_model.safetensors"), "pt") as saved:
            written = len(list(saved.keys()))
        if written != len(state_dict):  # peft drops keys it does not recognise, silently
            raise RuntimeError(f"adapter save wrote {written} of {len(state_dict)} tensors")
    return Path(target)
