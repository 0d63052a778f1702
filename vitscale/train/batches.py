"""The data path of a step on this rank: a source's ``Batch`` -> model inputs and loss target on the
device; and the collectives over the data sources of all ranks (their counters, their positions
for checkpoints, the tensor-parallel peers' batch check), alike for every source."""
from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.distributed as dist

from vitscale.data.packing import normalize_patches
from vitscale.data.sources import Batch, DataSource, device_renderer
from vitscale.data.transforms import crop_resize, normalize
from vitscale.experiment import Experiment
from vitscale.models.noise import sample_keys
from vitscale.train.augment import BatchAugment

logger = logging.getLogger(__name__)


def make_prepare(exp: Experiment, device: torch.device, dtype: torch.dtype) -> Callable[[Batch], tuple]:
    """``Batch`` -> (model inputs (a tuple), loss target) on ``device``: images rendered here
    (``data.render=device``: the batch holds labels and instances), or cut out and resized
    (crop boxes of image-text canvases) and normalised, or packed patches normalised (NaViT); then
    DeiT's random erasing and Mixup / CutMix when the config asks (``augment.BatchAugment``).

    A classifier takes (images,) (or (patches, coords, segments)) and its labels are the target;
    a CLIP takes (images, tokens) and its loss no target, but DeepSpeed's pipeline still wants a
    tensor in the target's place, so the tokens stand in."""
    d = exp.cfg.data
    mean, std = torch.tensor(d.mean, device=device), torch.tensor(d.std, device=device)
    render = device_renderer(exp.cfg)
    memory_format = torch.channels_last if uses_channels_last(exp.cfg.train.channels_last, device) else None

    def prepare(batch: Batch) -> tuple:
        if batch.patches is not None:
            patches = normalize_patches(batch.patches.to(device, non_blocking=True), mean, std, dtype)
            inputs = (patches, batch.coords.to(device, non_blocking=True),
                      batch.segments.to(device, non_blocking=True))
            return inputs, batch.labels.to(device, non_blocking=True)
        if batch.instances is not None:  # data.render=device: uint8 (B, 3, H, W) made here, no host copy
            images = render(batch.labels, batch.instances, device)
        else:
            images = batch.images.to(device, non_blocking=True)
        if batch.boxes is not None:  # channels-last canvases: cut and resize on the device, float 0-255
            images = crop_resize(images.permute(0, 3, 1, 2), batch.boxes, d.image_size)
        images = normalize(images, mean, std, dtype)
        if memory_format is not None:  # train.channels_last: the same values, NHWC in memory
            images = images.contiguous(memory_format=memory_format)
        if batch.tokens is not None:
            tokens = batch.tokens.to(device, non_blocking=True)
            return (images, tokens), tokens
        return (images,), batch.labels.to(device, non_blocking=True)

    if not BatchAugment.wanted(exp.cfg):
        return prepare
    augment = BatchAugment(exp.cfg, device)

    def augmented(batch: Batch) -> tuple:
        (images,), labels = prepare(batch)
        images, target = augment(images, labels)
        return (images,), target

    return augmented


def uses_channels_last(setting, device: torch.device) -> bool:
    """``train.channels_last`` (auto, true, false) resolved for ``device``: auto = on CUDA."""
    return setting is True or (setting == "auto" and device.type == "cuda")


def noise_keys(seed: int, step: int, micro: int, micro_batch: int, global_batch: int, data_rank: int,
               data_world: int, device: torch.device) -> torch.Tensor:
    """The noise keys (``models/noise.py``) of micro-batch ``micro`` of optimizer step ``step`` (0-based)
    on this data rank, from each sample's position in the run: ``step * global_batch + slot``, slot
    ``micro * (micro_batch * data_world) + data_rank * micro_batch + i`` being the sample's place in
    the step's global batch as the position-exact samplers number it (``synthetic_loader.StepSampler``).
    So a sample gets the same dropout and drop-path masks in every layout."""
    # Made on the device: a host tensor copied there would synchronise the host with a GPU's queue per
    # micro-batch (a pageable copy waits for the stream); the int64 hash gives the same keys anywhere.
    slots = micro * micro_batch * data_world + data_rank * micro_batch + torch.arange(micro_batch, dtype=torch.int64,
                                                                                       device=device)
    return sample_keys(seed, step * global_batch + slots)


def data_records(source_cls: type[DataSource], source: DataSource | None, dims, step: int) -> list[dict]:
    """Collective over all ranks, for sources that count (``source_cls.counters``): the counters summed
    over data ranks (``source`` None on ranks that do not report). Rank 0 logs them and returns a
    ``data`` record."""
    names = source_cls.counters
    stats = source.stats() if source is not None else {}
    counts = torch.tensor([float(stats.get(k, 0)) for k in names], dtype=torch.float64, device=dims.device)
    dist.all_reduce(counts)
    if not dims.is_main:
        return []
    fields, text = source_cls.summarize({k: int(v) for k, v in zip(names, counts.tolist())})
    logger.info("data at step %d: %s", step, text)
    return [{"kind": "data", "step": step, **fields}]


def check_tensor_peers(fingerprint: int, group, device) -> None:
    """Collective over a tensor-parallel group: its ranks must have read the same batch (they
    compute one model replica's shards); raise, naming the mismatch, if not."""
    mine = torch.tensor([fingerprint], dtype=torch.int64, device=device)
    peers = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(peers, mine, group=group)
    if len({int(p) for p in peers}) > 1:
        raise RuntimeError("the ranks of a tensor-parallel group read different batches (key checksums "
                           f"{[int(p) for p in peers]}); the loader must split by data-parallel rank")


def gather_positions(source: DataSource | None, dims) -> dict:
    """Collective: every data rank's source position, keyed by data rank (for the checkpoint)."""
    gathered = [None] * dims.world_size
    dist.all_gather_object(gathered, (dims.data_rank, source.state_dict()) if source is not None else None)
    return {str(rank): state for rank, state in filter(None, gathered)}
