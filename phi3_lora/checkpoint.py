"""Checkpoints you can trust: adapter-only state_dicts, checked loading, atomic resumable saves.

**Adapter state_dicts.** Only adapter tensors are saved (a few MB, never the base model), as
safetensors in PEFT's format. Under ZeRO-3 each parameter is partitioned across processes, so
collecting the adapter gathers the trainable parameters — only those — on every process (a
collective); only the main process writes. Loading applies the file with ``strict=False`` and
then *checks*: every key in the file must land on an adapter parameter of the model (else the file
is for another model, its prefix is foreign, or it would overwrite frozen base weights), and every
adapter parameter of the model must be covered; only missing base keys are expected. Prefixes of
DDP (``module.``), torch.compile and peft (``base_model.model.``, adapter names) are normalised
first. A wrong shape names both ranks.

**Resumable checkpoints** live in ``output_dir/checkpoints/step-NNNNNN/``: ``adapter/``, the
optimizer and LR scheduler states (and fp16's loss scale, ``scaler.json``), every process's RNG
states, ``trainer_state.json`` (data position, step, tokens, eval history, a fingerprint of the
settings) and ``config.yaml``.
Under DeepSpeed the optimizer partitions are DeepSpeed's own files in ``deepspeed/``.

**Atomic.** A checkpoint is written into a hidden temporary directory, fsynced, given a marker
(``COMPLETE.json``, which lists the SHA-256 of every file) and renamed into place; deletion
renames first. So a checkpoint directory is complete or absent, and a crash at any moment never
damages an earlier one. Before anything is read, every file is checked against the marker, so a
truncated, corrupted or replaced file is reported by name and never unpickled.

**Safe loading.** Tensors come only from safetensors; the few other files are JSON, or torch
files read with ``weights_only=True`` (after the checksum check). DeepSpeed's own files, which it
reads with ``weights_only=False``, are read the same way too (``deepspeed_loads_safely``), with
the four DeepSpeed classes its optimizer states hold allowed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError

MARKER = "COMPLETE.json"
STEP_DIR = re.compile(r"^step-(\d{6,})$")


class CheckpointError(ValueError):
    """A checkpoint or adapter file is missing, damaged, or does not fit the model; the message names it."""


EXIT_PREEMPTED = 75  # EX_TEMPFAIL: a checkpoint was saved on a preemption signal; run again to resume


class Preempted(Exception):
    """Raised once the checkpoint of a preempted run is saved; the CLI exits with ``EXIT_PREEMPTED``."""


# ----------------------------------------------------------------------------- adapter state_dicts

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


def write_peft_adapter(peft_model, state_dict: dict[str, torch.Tensor], directory: Path) -> None:
    """``adapter_config.json`` + ``adapter_model.safetensors`` (PEFT format) into ``directory``, checked
    complete. ``lora.save_adapter`` wraps it in an atomic directory."""
    from safetensors import safe_open

    peft_model.save_pretrained(directory, state_dict=state_dict, safe_serialization=True)
    with safe_open(str(directory / "adapter_model.safetensors"), "pt") as saved:
        written = len(list(saved.keys()))
    if written != len(state_dict):  # peft drops keys it does not recognise, silently
        raise RuntimeError(f"adapter save wrote {written} of {len(state_dict)} tensors")


_ADAPTER_PARTS = ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector")


def normalise_adapter_key(key: str, adapter_name: str = "default", peft: bool = True) -> str:
    """Map a key saved by DDP, DeepSpeed, torch.compile or peft to the model's parameter name
    (``peft``: the model is a peft model, whose names carry ``base_model.model.`` and the adapter name)."""
    for prefix in ("module.", "_orig_mod."):
        while key.startswith(prefix):
            key = key[len(prefix):]
    if not peft:
        return key
    if not key.startswith("base_model.model."):
        key = "base_model.model." + key
    parts = key.split(".")
    for i, part in enumerate(parts):
        if part in _ADAPTER_PARTS and (i + 1 >= len(parts) or parts[i + 1] != adapter_name):
            parts.insert(i + 1, adapter_name)
            if part == "lora_magnitude_vector" and i + 2 == len(parts):  # peft saves DoRA's without ".weight"
                parts.append("weight")
            break
    return ".".join(parts)


def _rank_of(name: str, shape: torch.Size) -> int | None:
    if ".lora_A." in name or ".lora_embedding_A." in name:
        return shape[0]
    if ".lora_B." in name or ".lora_embedding_B." in name:
        return shape[-1]
    return None


def load_adapter_state(model, state: dict[str, torch.Tensor], source: str) -> int:
    """Apply an adapter state_dict with ``strict=False``, then check that it really landed.

    Raises:
        CheckpointError: keys of the file match no parameter (another model, or a foreign prefix) or a
            frozen base weight, adapter parameters of the model are not in the file, or shapes differ
            (another rank).
    Returns:
        The number of base-model keys that were (expectedly) missing.
    """
    params = dict(model.named_parameters())
    adapter = {name for name, p in params.items() if p.requires_grad}
    is_peft = any(name.startswith("base_model.model.") for name in params)
    renamed = {normalise_adapter_key(k, peft=is_peft): v for k, v in state.items()}
    unexpected = sorted(set(renamed) - set(params))
    if unexpected:
        raise CheckpointError(f"{source}: {len(unexpected)} of {len(renamed)} keys match no parameter of this "
                              f"model (another model, or a foreign prefix?), e.g. {', '.join(unexpected[:3])}")
    frozen = sorted(set(renamed) - adapter)
    if frozen:  # a key for a base weight would overwrite the frozen model it lands on
        raise CheckpointError(f"{source}: {len(frozen)} keys are weights of the frozen base model, not adapter "
                              f"parameters (an adapter file holds only adapter tensors), e.g. {', '.join(frozen[:3])}")
    missing = sorted(adapter - set(renamed))
    if missing:
        raise CheckpointError(f"{source}: {len(missing)} adapter parameters of the model are not in the file, "
                              f"e.g. {', '.join(missing[:3])}")
    for name, value in renamed.items():
        expected = params[name].ds_shape if hasattr(params[name], "ds_shape") else params[name].shape
        if tuple(value.shape) != tuple(expected):
            found_r, want_r = _rank_of(name, value.shape), _rank_of(name, expected)
            rank = f" (rank {found_r} in the file, the model has rank {want_r})" if found_r != want_r else ""
            raise CheckpointError(f"{source}: {name} has shape {tuple(value.shape)}, the model expects "
                                  f"{tuple(expected)}{rank}")
    result = model.load_state_dict(renamed, strict=False)
    if result.unexpected_keys:  # cannot happen after the checks above; a guard against silent loads
        raise CheckpointError(f"{source}: unexpected keys {result.unexpected_keys[:3]}")
    return len(result.missing_keys)


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a safetensors file, or a CheckpointError naming the file (never unpickles)."""
    from safetensors.torch import load_file
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises several types for bad headers and short files
        raise CheckpointError(f"{path}: not a valid safetensors file ({str(err).splitlines()[0]})") from None


def torch_load(path: Path, map_location="cpu"):
    """``torch.load(weights_only=True)``: plain tensors and containers only, never arbitrary objects."""
    if not Path(path).is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:
        raise CheckpointError(f"{path}: {_unsafe_load_reason(err)}") from None


def _unsafe_load_reason(err: Exception) -> str:
    """What a refused or failed tensors-only load says, in one line (not PyTorch's advice to unpickle anyway)."""
    refused = re.search(r"GLOBAL ([\w.]+)", str(err))
    if refused:
        return (f"holds a Python object ({refused.group(1)}) that only an unpickling load would build, which "
                "could run any code; refused")
    if "Weights only load failed" in str(err):
        return "not a tensors-only PyTorch file; refused (reading it would need unpickling)"
    return f"cannot be read ({str(err).splitlines()[0][:200]})"


# What DeepSpeed's optimizer-state files hold besides tensors and containers: its loss scalers (also in bf16
# and fp32 runs), ZeRO's stage enum and the fragment addresses of its flat buffers.
DEEPSPEED_SAFE_GLOBALS = ("deepspeed.runtime.fp16.loss_scaler.LossScaler",
                          "deepspeed.runtime.fp16.loss_scaler.DynamicLossScaler",
                          "deepspeed.runtime.zero.config.ZeroStageEnum",
                          "deepspeed.utils.tensor_fragment.fragment_address")


TRUSTED_GLOBALS_ENV = "PHI3_LORA_TRUSTED_GLOBALS"  # more classes to allow there, "module.Class,module.Class"


@contextlib.contextmanager
def deepspeed_loads_safely(engine):
    """Within this context ``engine`` (a DeepSpeedEngine) reads its checkpoint files with
    ``torch.load(weights_only=True)``, ``DEEPSPEED_SAFE_GLOBALS`` allowed (and the classes the user names in
    ``$PHI3_LORA_TRUSTED_GLOBALS``, for a DeepSpeed version that saves another), instead of its own unpickling
    load; any other object in them is a CheckpointError naming the file and the object."""
    import importlib

    trusted = os.environ.get(TRUSTED_GLOBALS_ENV, "").replace(" ", "")
    names = [*DEEPSPEED_SAFE_GLOBALS, *filter(None, trusted.split(","))]
    try:
        allowed = [getattr(importlib.import_module(module), name)
                   for module, _, name in (g.rpartition(".") for g in names)]
    except (ImportError, AttributeError, ValueError) as err:
        raise ConfigError(f"{TRUSTED_GLOBALS_ENV}: cannot import a class it names ({err})") from None
    checkpoint_engine = engine.checkpoint_engine

    def load(path, map_location=None):
        try:
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)
        except Exception as err:
            hint = (f" (if you trust this checkpoint, and DeepSpeed saved that class, allow it with "
                    f"{TRUSTED_GLOBALS_ENV}=NAME)" if "GLOBAL" in str(err) else "")
            raise CheckpointError(f"{path}: {_unsafe_load_reason(err)}{hint}") from None

    checkpoint_engine.load = load  # an instance attribute, in front of the class's method
    try:
        yield
    finally:
        del checkpoint_engine.load


# ----------------------------------------------------------------------------- atomic directories

def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def commit_directory(tmp: Path, target: Path, manifest: bool = False, extra: dict | None = None) -> None:
    """fsync ``tmp`` (files and directories), optionally write the marker with every file's checksum, and
    rename it to ``target``."""
    for path in _files(tmp):
        _fsync(path)
    for path in sorted(p for p in tmp.rglob("*") if p.is_dir()):  # their entries: a power loss keeps the files
        _fsync(path)
    if manifest:
        files = {str(p.relative_to(tmp)): _sha256(p) for p in _files(tmp)}
        marker = tmp / MARKER
        marker.write_text(json.dumps({**(extra or {}), "files": files}, indent=1))
        _fsync(marker)
    _fsync(tmp)
    old = None
    if target.exists() or target.is_symlink():
        old = target.parent / f".{target.name}.old"
        remove_path(old)
        target.rename(old)
    tmp.rename(target)
    _fsync(target.parent)
    if old is not None:
        remove_path(old)


@contextlib.contextmanager
def atomic_directory(target: str | Path, manifest: bool = False):
    """Yield a temporary directory beside ``target``; on success fsync it and rename it to ``target``.

    An existing ``target`` is replaced only after the new one is complete. On an error the
    temporary directory is removed and ``target`` is left as it was. ``manifest``: with the marker listing
    every file's checksum, as a checkpoint's.
    """
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp"
    remove_path(tmp)
    tmp.mkdir()
    try:
        yield tmp
        commit_directory(tmp, target, manifest=manifest)
    except BaseException:
        remove_path(tmp, best_effort=True)  # the error that stopped the save is the one to report
        raise


def check_can_create(path: str | Path, what: str, directory: bool = True, replaced: bool = False) -> None:
    """Raise a ConfigError naming ``what`` (``output_dir``, ``--out``...) unless ``path`` can be written, checked
    before the work so that it never ends in a traceback with nothing written: an existing file (written in place:
    ``/dev/stdout`` too) or directory that is writable, else a new one whose nearest existing ancestor is a
    writable directory. ``replaced``: the entry is replaced by a rename (``atomic_directory``), so its parent
    must be writable whether or not it exists."""
    path = Path(path)
    try:
        if path.exists() and path.is_dir() != directory:
            raise ConfigError(f"{what} {path}: exists and is {'not ' if directory else ''}a directory")
        if path.exists() and not replaced:
            where, mode = path, os.W_OK | (os.X_OK if directory else 0)
        else:
            where, mode = path.parent, os.W_OK | os.X_OK
            while not where.exists() and where != where.parent:
                where = where.parent
            if not where.is_dir():
                raise ConfigError(f"{what} {path}: {where} is a file, not a directory")
        if not os.access(where, mode):
            raise ConfigError(f"{what} {path}: {where} is not writable")
    except PermissionError as err:  # a directory on the way that this user may not enter
        raise ConfigError(f"{what} {path}: {err.strerror} ({err.filename})") from None


def remove_path(path: Path, best_effort: bool = False) -> None:
    """Delete a directory tree, a file or a symbolic link — the link, never what it points at; nothing if absent.
    ``best_effort``: what cannot be deleted (another user's file, a busy NFS file) stays, without an error."""
    try:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path, ignore_errors=best_effort)
    except OSError:
        if not best_effort:
            raise


def remove_directory(path: Path) -> None:
    """Rename, then delete: a crash half-way leaves a hidden entry, never a half checkpoint. A checkpoint that is
    a symbolic link loses the link only: what it points at, outside this run's checkpoints/, stays."""
    doomed = path.parent / f".{path.name}.deleting"
    remove_path(doomed)
    path.rename(doomed)
    remove_path(doomed)


# ----------------------------------------------------------------------------- checkpoint directories

def checkpoints_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def step_directory(output_dir: str | Path, step: int) -> Path:
    return checkpoints_root(output_dir) / f"step-{step:06d}"


def complete_checkpoints(output_dir: str | Path) -> list[Path]:
    """Checkpoint directories that carry the marker, oldest first. Hidden (temporary) ones never count."""
    root = checkpoints_root(output_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if STEP_DIR.match(p.name) and (p / MARKER).is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


def saved_step(path: Path) -> int:
    """The optimizer step a checkpoint directory (``step-NNNNNN``) was saved at, from its name: no file of an
    old, unverified checkpoint is read to learn it."""
    found = STEP_DIR.match(Path(path).name)
    if not found:
        raise CheckpointError(f"{path}: not a checkpoint directory (expected a name like step-000100)")
    return int(found.group(1))


def restore_interrupted_replacements(output_dir: str | Path) -> list[Path]:
    """Put back what a crash between the two renames of ``commit_directory`` left only as ``.NAME.old``: the
    checkpoint (a final save at the step of the checkpoint a run resumed from replaces it) or the adapter being
    replaced, complete as it was before the save began. Returns the entries put back."""
    root = checkpoints_root(output_dir)
    olds = [*(sorted(root.glob(".*.old")) if root.is_dir() else []), Path(output_dir) / ".adapter.old"]
    restored = []
    for old in olds:
        target = old.parent / old.name[1:-len(".old")]
        if old.is_dir() and not (target.exists() or target.is_symlink()):
            old.rename(target)
            _fsync(target.parent)
            restored.append(target)
    return restored


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete what a crash left half-written, as far as it can: hidden entries under checkpoints/, and the adapter's
    (``.adapter.tmp``, ``.adapter.old``) in ``output_dir``, after putting back an entry that a crash while
    replacing it left only as ``.NAME.old`` (``restore_interrupted_replacements``)."""
    restore_interrupted_replacements(output_dir)
    root = checkpoints_root(output_dir)
    stale = [p for p in root.iterdir() if p.name.startswith(".")] if root.is_dir() else []
    for p in [*stale, Path(output_dir) / ".adapter.tmp", Path(output_dir) / ".adapter.old"]:
        remove_path(p, best_effort=True)


def verify_checkpoint(path: Path) -> dict:
    """Check every file against the marker's checksums; returns the marker.

    Raises:
        CheckpointError: no marker (incomplete), a listed file missing, or a file whose bytes changed.
    """
    marker = path / MARKER
    if not marker.is_file():
        raise CheckpointError(f"{path}: incomplete checkpoint (no {MARKER})")
    info = read_marker(marker)
    for name, digest in info["files"].items():
        check_file(path / name, digest)
    return info


def read_marker(marker: Path) -> dict:
    try:
        info = json.loads(marker.read_text())
        files = info["files"]
        if not isinstance(files, dict) or not all(isinstance(v, str) for v in files.values()):
            raise TypeError
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError):
        raise CheckpointError(f"{marker}: damaged marker file") from None
    return info


def check_file(file: Path, digest: str, where: str = "the checkpoint") -> None:
    if not file.is_file():
        raise CheckpointError(f"{file}: missing from {where}")
    if _sha256(file) != digest:
        raise CheckpointError(f"{file}: does not match its checksum (corrupted or replaced)")


def verify_adapter_weights(adapter: Path) -> None:
    """Check an adapter's tensors files against the checksums recorded when it was saved: in its own marker (a
    run's final ``adapter/``), else in its checkpoint's (``checkpoints/step-N/adapter``). Without either (an
    adapter another tool saved, or this one before 2026-12-07) nothing is checked here. Its other files (users
    edit ``adapter_config.json``) are checked as they are read. Delete the adapter's marker to load weights
    changed on purpose."""
    adapter, checkpoint = Path(adapter), Path(adapter).resolve().parent
    if (adapter / MARKER).is_file():
        marker, prefix = adapter / MARKER, ""
    elif STEP_DIR.match(checkpoint.name) and (checkpoint / MARKER).is_file():
        marker, prefix = checkpoint / MARKER, f"{adapter.resolve().name}/"
    else:
        return
    for name, digest in read_marker(marker)["files"].items():
        if name.startswith(prefix) and name.endswith(".safetensors"):
            check_file(marker.parent / name, digest, where=f"the adapter (its {marker.name} lists it)")


def rotate(output_dir: str | Path, keep: int, protected: set[Path]) -> list[Path]:
    """Keep the newest ``keep`` checkpoints, the best (lowest eval loss) and ``protected``; delete the rest
    (entries of this run's checkpoints/: one that is a symbolic link loses the link, not its target)."""
    checkpoints = complete_checkpoints(output_dir)
    if keep <= 0 or len(checkpoints) <= keep:
        return []
    protected = {p.resolve() for p in protected}
    keepers = set(checkpoints[-keep:]) | {p for p in checkpoints if p.resolve() in protected}
    scored = [(loss, p) for p in checkpoints if (loss := _eval_loss_at_save(p)) is not None]
    if scored:
        keepers.add(min(scored, key=lambda item: item[0])[1])
    removed = [p for p in checkpoints if p not in keepers]
    for p in removed:
        remove_directory(p)
    return removed


def _eval_loss_at_save(path: Path) -> float | None:
    """The eval loss a checkpoint was saved with, or None: not evaluated at its step, or its state unreadable
    (a damaged old checkpoint is not ranked, and never stops the run that is saving)."""
    try:
        loss = json.loads((path / "trainer_state.json").read_text()).get("eval_loss_at_save")
    except (OSError, ValueError, AttributeError):
        return None
    return loss if isinstance(loss, (int, float)) else None


# ----------------------------------------------------------------------------- RNG states

def rng_state() -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON-able python/numpy states, torch/CUDA state tensors) of this process."""
    version, internal, gauss = random.getstate()
    np_state = np.random.get_state()
    plain = {"python": [version, list(internal), gauss],
             "numpy": [np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])]}
    tensors = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():  # this process's GPU only: a resumed job may see a different number of them
        tensors["cuda"] = torch.cuda.get_rng_state()
    return plain, tensors


def set_rng_state(plain: dict, tensors: dict[str, torch.Tensor]) -> None:
    version, internal, gauss = plain["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, pos, has_gauss, cached = plain["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch"])
    if torch.cuda.is_available():  # checkpoints before 2026-12-05 hold cuda0, cuda1, ... (every visible GPU's)
        cuda = tensors["cuda"] if "cuda" in tensors else tensors.get(f"cuda{torch.cuda.current_device()}")
        if cuda is not None:
            torch.cuda.set_rng_state(cuda)
