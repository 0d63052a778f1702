"""Loads that cannot run code: every checkpoint or weights file vitscale reads is unpickled with
``torch.load(..., weights_only=True)`` (or is a ``.safetensors`` file, which holds no code).

A torch file is a pickle: loaded with ``weights_only=False`` (DeepSpeed's own checkpoint engine,
``zero_to_fp32``), a file crafted by someone else runs any code it names as it loads. A run folder
or a ``.pt`` file from elsewhere must not be able to do that, so there is one reader, ``load_file``:
tensors and plain Python data, plus by name the few DeepSpeed classes its checkpoints pickle, each
plain data (``deepspeed_data_classes``). Anything else is refused before any of it is built, with
``UnsafeCheckpoint`` naming the file and the global it asked for.

Who reads through it: resume (``safe_deepspeed_loads`` gives the DeepSpeed engine a checkpoint
engine whose ``load`` is ``load_file``: the model, optimizer and ZeRO files ``engine.load_checkpoint``
reads), the RNG state files, ``checkpoint.read_checkpoint`` (``vitscale-export``, ``vitscale-eval``,
``model.init`` from a run folder, ``checkpoint.reshard=weights``, the client state) and ``model.init``
from a ``.pt`` file. DeepSpeed's loaders with a ``torch.load`` of their own (``zero_to_fp32`` and
universal checkpoints: ``weights_only=False``; the datastates / fast / decoupled checkpoint engines)
are not used: a preset asking for them is refused before start (``config/deepspeed.py``), and
``safe_deepspeed_loads`` checks again on the built engine.
"""
from __future__ import annotations

import contextlib
import pickle
import re
from pathlib import Path
from typing import Callable, Iterator

import torch


class UnsafeCheckpoint(ValueError):
    """A torch file that holds objects other than tensors and plain data (its code did not run)."""

    def __init__(self, path: str | Path, reason: str):
        self.path = Path(path)
        super().__init__(
            f"{path}: this checkpoint holds objects other than tensors and plain data ({reason}), and loading it "
            "could run code. vitscale loads only with torch.load(weights_only=True) (DeepSpeed's plain-data classes "
            "allowed by name), so nothing of it was built or run. Use a checkpoint vitscale wrote (another "
            "checkpoint.resume / model.init, or checkpoint.resume=never), or, if you trust whoever wrote this one, "
            "convert its tensors once to a .safetensors file (safetensors.torch.save_file) and give that to model.init")


def deepspeed_data_classes() -> list:
    """The DeepSpeed classes its checkpoints pickle, each plain data (no code runs to rebuild
    them): the loss scalers, the ZeRO stage enum, the fragment addresses of ``param_slice_mappings``."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def load_file(path: str | Path, map_location="cpu", mmap: bool = False):
    """A torch file, ``weights_only=True`` (``deepspeed_data_classes`` allowed by name, nothing else).

    Args:
        path: the file.
        map_location: as ``torch.load``'s (DeepSpeed passes its own).
        mmap: tensors stay in the file until read (optimizer states, of which only the weights are used).

    Raises:
        UnsafeCheckpoint: the file asks for anything else (a class, a function): nothing of it was built.
    """
    with torch.serialization.safe_globals(deepspeed_data_classes()):
        try:
            loaded = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
        except pickle.UnpicklingError as e:
            raise UnsafeCheckpoint(path, _refused_global(str(e))) from None
    for watcher in list(_watchers):
        watcher(Path(path))
    return loaded


_watchers: list[Callable[[Path], None]] = []


@contextlib.contextmanager
def watching_reads(watcher: Callable[[Path], None]) -> Iterator[None]:
    """Call ``watcher(path)`` after each file ``load_file`` reads, while inside (a progress bar
    over the files of a checkpoint, ``vitscale-export``); only in this process."""
    _watchers.append(watcher)
    try:
        yield
    finally:
        _watchers.remove(watcher)


def _refused_global(message: str) -> str:
    """What torch's weights-only unpickler refused, from its message (which also suggests
    ``weights_only=False``: not our advice)."""
    found = re.search(r"Unsupported (?:global|operand)[^.\n]*?: ?(?:GLOBAL )?([\w.<>]+)", message)
    if found:
        return f"it asks for {found.group(1)}"
    return message.strip().splitlines()[0][:200] if message.strip() else "refused by torch's weights-only unpickler"


def safe_deepspeed_loads(engine) -> None:
    """Make every load of the DeepSpeed ``engine`` (``engine.load_checkpoint``: model states, optimizer
    and ZeRO partitions, pipeline layer files) go through ``load_file``.

    DeepSpeed reads checkpoint files only through its engine's checkpoint engine, a pluggable class
    (``deepspeed.runtime.checkpoint_engine``: its ``load`` is one ``torch.load(weights_only=False)``),
    and its config offers no way to name one of our own; so the engine built from the config is
    swapped, right after ``deepspeed.initialize``, for a subclass that differs in ``load`` alone
    (saving stays DeepSpeed's). The universal-checkpoint loader (``weights_only=False``) and the
    datastates / fast / decoupled engines read with a ``torch.load`` of their own and are refused.

    Raises:
        ValueError: the DeepSpeed config chose a checkpoint engine or loader this cannot make safe.
    """
    from deepspeed.runtime.checkpoint_engine import TorchCheckpointEngine

    current = engine.checkpoint_engine
    if type(current) is not TorchCheckpointEngine:
        raise ValueError(f"the DeepSpeed preset chose the checkpoint engine {type(current).__name__}, whose loads "
                         "bypass vitscale's weights-only reader; remove its 'checkpoint.writer' / 'datastates_ckpt' "
                         "settings")
    if engine.load_universal_checkpoint():
        raise ValueError("the DeepSpeed preset sets load_universal_checkpoint, whose loads can run code "
                         "(torch.load(weights_only=False)); remove it (checkpoint.reshard=weights changes layouts)")

    class WeightsOnlyCheckpointEngine(TorchCheckpointEngine):
        """DeepSpeed's torch checkpoint engine, loading through ``load_file``."""

        def load(self, path: str, map_location=None):
            return load_file(path, map_location=map_location)

    safe = WeightsOnlyCheckpointEngine.__new__(WeightsOnlyCheckpointEngine)
    safe.__dict__.update(current.__dict__)  # the engine's own settings (serialization), without re-logging them
    engine.checkpoint_engine = safe
