"""Whole-model reads once per node, not once per rank (issue 19): ``model.init`` and
``checkpoint.reshard=weights`` need the whole model's tensors to cut each rank's piece from.

The first rank of each node (local rank 0) reads the weights (any format: safetensors, a torch
file, a run folder merged from any layout) and writes them once to a node-local file in
safetensors format (``$VITSCALE_NODE_TMP``, else ``/dev/shm``, a RAM disk, else the temporary
folder: the first with room for it).
Every rank of the node then opens that file lazily (safetensors' ``safe_open``: nothing is read
until a tensor is asked for) and takes only the tensors its piece needs, one at a time
(``interop.shard_state_dict`` asks for them by name). So per node: one read of the weights from
the shared file system, one copy of the model in node memory, and each rank holding its own
piece plus one whole tensor at a time, where every rank used to read and hold the whole model.

Why a file and not a broadcast: a broadcast within the node hands every rank the whole model
(the memory this avoids), while ranks of one node can map one safetensors file and slice it.
"""
from __future__ import annotations

import contextlib
import importlib
import logging
import os
import tempfile
import uuid
from collections.abc import Mapping, MutableMapping
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist

from vitscale.files import replacing

logger = logging.getLogger(__name__)

StateDict = dict[str, torch.Tensor]


class LazyState(Mapping):
    """A safetensors file as a read-only mapping name -> tensor, each read when asked for."""

    def __init__(self, path: str | Path):
        from safetensors import safe_open

        self.path = Path(path)
        self._file = safe_open(str(path), framework="pt", device="cpu")
        self._keys = list(self._file.keys())
        self.tensors_read = 0  # how many tensors this rank took from the file (tests count them)

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._keys:
            raise KeyError(key)
        self.tensors_read += 1
        return self._file.get_tensor(key)

    def __contains__(self, key: object) -> bool:
        return key in self._keys

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def shape(self, key: str) -> tuple[int, ...]:
        """The tensor's shape, from the file's header (no data read)."""
        return tuple(self._file.get_slice(key).get_shape())


class Overlay(MutableMapping):
    """Changes over a read-only mapping (set, replaced, deleted keys) that leave the tensors not
    changed unread: ``initial_weights.adapt_state_dict`` replaces a head, resamples a position
    embedding, drops a logit bias."""

    def __init__(self, base: Mapping):
        self.base, self.changed, self.deleted = base, {}, set()

    def __getitem__(self, key):
        if key in self.changed:
            return self.changed[key]
        if key in self.deleted:
            raise KeyError(key)
        return self.base[key]

    def __setitem__(self, key, value) -> None:
        self.changed[key] = value
        self.deleted.discard(key)

    def __delitem__(self, key) -> None:
        if key not in self:
            raise KeyError(key)
        self.changed.pop(key, None)
        self.deleted.add(key)

    def __contains__(self, key) -> bool:
        return key in self.changed or (key not in self.deleted and key in self.base)

    def __iter__(self):
        yield from self.changed
        yield from (k for k in self.base if k not in self.changed and k not in self.deleted)

    def __len__(self) -> int:
        return sum(1 for _ in self)


def shape_of(state: Mapping, key: str) -> tuple[int, ...]:
    """A tensor's shape without reading it where the mapping can tell (``LazyState`` / ``Overlay``)."""
    if isinstance(state, Overlay):
        if key in state.changed:
            value = state.changed[key]
            return tuple(value.shape) if value is not None else ()
        return shape_of(state.base, key)
    if isinstance(state, LazyState):
        return state.shape(key)
    return tuple(state[key].shape)


def node_folders() -> list[Path]:
    """Where a node may keep its copy, in order of preference: ``$VITSCALE_NODE_TMP``, ``/dev/shm``
    (memory), the temporary folder (node-local disk on most clusters)."""
    out = [Path(os.environ["VITSCALE_NODE_TMP"])] if os.environ.get("VITSCALE_NODE_TMP") else []
    out += [Path("/dev/shm"), Path(tempfile.gettempdir())]
    return [p for p in out if p.is_dir() and os.access(p, os.W_OK)]


def _free_bytes(folder: Path) -> int:
    st = os.statvfs(folder)
    return st.f_bavail * st.f_frsize


def _save(state: Mapping[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    seen: set[int] = set()
    tensors = {}
    for key, value in state.items():
        value = value.detach().contiguous()
        ptr = value.untyped_storage().data_ptr() if value.numel() else None
        if ptr in seen:  # tied tensors: safetensors stores each storage once; give the tie its own copy
            value = value.clone()
        if ptr is not None:
            seen.add(ptr)
        tensors[key] = value
    with replacing(path) as tmp:
        save_file(tensors, str(tmp))


def _describe(error: Exception) -> tuple[str, str, str, dict]:
    """What another rank needs to raise the same error: class, message, plain attributes."""
    attrs = {k: v for k, v in vars(error).items() if isinstance(v, (str, int, float, bool, Path))}
    return type(error).__module__, type(error).__qualname__, str(error), attrs


def _rebuilt(info: tuple[str, str, str, dict], what: str) -> Exception:
    """The error another rank described (``_describe``), of the same class where it is ours or a
    built-in one (built without calling its ``__init__``, whose arguments may differ), else RuntimeError."""
    module, qualname, message, attrs = info
    cls = None
    if module == "builtins" or module.startswith("vitscale."):
        cls = getattr(importlib.import_module(module), qualname, None)
    if not (isinstance(cls, type) and issubclass(cls, Exception)):
        cls = RuntimeError
    error = cls.__new__(cls)
    Exception.__init__(error, f"{message} ({what}: read by this node's first rank)")
    vars(error).update(attrs)
    return error


@contextlib.contextmanager
def read_once_per_node(read: Callable[[], Mapping[str, torch.Tensor]], dims, what: str) -> Iterator[Mapping]:
    """Collective over all ranks: ``read()`` on each node's first rank, its tensors then available
    to every rank of the node as a lazy mapping for the body of the ``with``; the node's copy is
    removed after every rank has left it.

    Args:
        read: returns the whole model's state dict (it runs once per node).
        dims: this process's ``ParallelDims`` (``local_rank``, ``node``, ``device``); None or a
            world of one: ``read()`` itself, no copy.
        what: a word for the log and the file name (``model_init``, ``reshard``).
    """
    if dims is None or not dist.is_initialized() or dist.get_world_size() == 1:
        yield read()
        return
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(token, src=0)  # one name for the job's copies
    name = f"vitscale-{token[0]}-{what}-node{dims.node}.safetensors"
    error = None
    if dims.local_rank == 0:
        try:
            state = read()
            size = sum(v.numel() * v.element_size() for v in state.values()) + (1 << 20)
            # /dev/shm is often small in containers (64 MB by default under Docker): the first folder with room
            folder = next((f for f in node_folders() if _free_bytes(f) > size), None)
            if folder is None:
                raise OSError(f"no folder with {size / 2**30:.1f} GiB free for the node's copy of the weights among "
                              f"{[str(f) for f in node_folders()]}; set VITSCALE_NODE_TMP to a node-local folder")
            _save(state, folder / name)
            del state
            logger.info("%s: read once on this node, shared with its ranks through %s", what, folder / name)
        except Exception as exc:  # noqa: BLE001 -- re-raised below, after the other ranks know
            error = exc
    # Every rank waits for its node's copy; a failed read on any node fails every rank (not a hang),
    # each with the error of its node's reader (or the first one): the same kind on every rank, so
    # that a refused file (safe_load.UnsafeCheckpoint) ends every rank as a refused input.
    infos: list = [None] * dist.get_world_size()
    dist.all_gather_object(infos, (dims.node, _describe(error)) if error is not None else None)
    if error is not None:
        for folder in node_folders():
            (folder / name).unlink(missing_ok=True)
        raise error
    failed = [info for info in infos if info is not None]
    if failed:
        raise _rebuilt(next((d for node, d in failed if node == dims.node), failed[0][1]), what)
    path = next((f / name for f in node_folders() if (f / name).is_file()), None)
    if path is None:
        raise RuntimeError(f"{what}: this node's copy {name} is in none of {[str(f) for f in node_folders()]}: do "
                           "the ranks of one node see different folders (VITSCALE_NODE_TMP)?")
    try:
        yield LazyState(path)
    finally:
        dist.barrier()  # every rank of the node is done with the copy
        if dims.local_rank == 0:
            path.unlink(missing_ok=True)
