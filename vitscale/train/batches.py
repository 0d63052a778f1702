"""This rank's micro-batches for the step loop: the loader for the config's data source, the
device-side preparation of a batch, and the collectives over the image-text loader's state
(counters, positions for checkpoints, the tensor-parallel peers' batch check)."""
from __future__ import annotations

import logging
import zlib

import torch
import torch.distributed as dist

from vitscale.config import Config, is_clip, model_arch
from vitscale.data.captions import CaptionTokenizer, build_caption_loader
from vitscale.data.downstream import build_downstream_loader, uses_downstream_loader
from vitscale.data.laion import BAD, COUNTERS, build_laion_loader, describe_stats
from vitscale.data.packing import normalize_patches, pack_batches
from vitscale.data.synthetic_loader import build_train_loader
from vitscale.data.transforms import crop_resize, normalize
from vitscale.train.finetune import BatchAugment

logger = logging.getLogger(__name__)


def build_loader(cfg: Config, dims, start: int, state: dict | None = None):
    """This rank's endless micro-batches: (images, labels) for a classifier, (images, token
    ids) for a CLIP on synthetic captions, (canvas images, token ids, crop boxes) for a CLIP
    on image-text shards (``data.source=laion``; ``state`` = its position from a checkpoint)."""
    t, d, pin = cfg.train, cfg.data, dims.device.type == "cuda"
    if d.source == "laion":
        text = model_arch(cfg).text
        return build_laion_loader(d, CaptionTokenizer(text.vocab_size, text.context_length), t.seed, t.micro_batch,
                                  dims.data_rank, dims.data, d.image_size, state=state, pin_memory=pin)
    if is_clip(cfg):
        text = model_arch(cfg).text
        return build_caption_loader(d.source, d.num_classes, d.image_size, d.instances, t.seed, t.micro_batch,
                                    t.global_batch, dims.data_rank, dims.data, start, d.num_workers, d.prefetch,
                                    pin, d.params, text.context_length, text.vocab_size)
    if uses_downstream_loader(d):  # fine-tuning data through timm's transforms
        return build_downstream_loader(d, t.seed, t.micro_batch, t.global_batch, dims.data_rank, dims.data,
                                       start_step=start, pin_memory=pin)
    loader = build_train_loader(d, t.seed, t.micro_batch, t.global_batch, dims.data_rank, dims.data,
                                start_step=start, pin_memory=pin)
    return _pack(cfg, loader, dims.data_rank) if d.packing.seq_len else loader


def _pack(cfg: Config, loader, data_rank: int):
    """NaViT packing as a loader stage: the image micro-batches -> micro-batches of packed
    sequences (patches, coords, segments, labels); see ``vitscale.data.packing``."""
    pk, arch = cfg.data.packing, model_arch(cfg)
    return pack_batches(loader, cfg.train.micro_batch, patch_size=arch.patch_size, seq_len=pk.seq_len,
                        max_images=pk.max_images, max_size=cfg.data.image_size, min_size=pk.min_size or None,
                        token_drop=pk.token_drop, seed=cfg.train.seed * 1000 + data_rank)


def _packed_prepare(device: torch.device, mean: torch.Tensor, std: torch.Tensor, dtype: torch.dtype):
    def prepare(patches, coords, segments, labels):
        """A packed micro-batch -> ((normalised patches, coords, segments), labels) on the device."""
        patches = normalize_patches(patches.to(device, non_blocking=True), mean, std, dtype)
        coords, segments = coords.to(device, non_blocking=True), segments.to(device, non_blocking=True)
        return (patches, coords, segments), labels.to(device, non_blocking=True)

    return prepare


def make_prepare(cfg: Config, dims, dtype: torch.dtype):
    """A fetched micro-batch -> (model inputs, loss target) on the device: images cut out and
    resized (crop boxes of image-text canvases), normalised, then DeiT's random erasing and
    Mixup / CutMix when the config asks; packed sequences (NaViT) instead when packing is on."""
    mean = torch.tensor(cfg.data.mean, device=dims.device)
    std = torch.tensor(cfg.data.std, device=dims.device)
    clip = is_clip(cfg)

    def prepare(images, second, boxes=None):
        """(uint8 images, labels or token ids[, crop boxes]) -> (model inputs, loss target)."""
        images = images.to(dims.device, non_blocking=True)
        if boxes is not None:  # channels-last canvases: cut and resize on the device, float 0-255
            images = crop_resize(images.permute(0, 3, 1, 2), boxes, cfg.data.image_size)
        images = normalize(images, mean, std, dtype)
        second = second.to(dims.device, non_blocking=True)
        # A CLIP takes (images, tokens) and its loss no target; DeepSpeed's pipeline still
        # wants a tensor in the target's place, so the tokens stand in.
        return ((images, second), second) if clip else (images, second)

    plain = _packed_prepare(dims.device, mean, std, dtype) if cfg.data.packing.seq_len else prepare
    if not BatchAugment.wanted(cfg):
        return plain
    augment = BatchAugment(cfg, dims.device)  # DeiT's random erasing and Mixup / CutMix on the normalised batch
    return lambda *batch: augment(*plain(*batch))


def data_records(source, dims, step: int) -> list[dict]:
    """Collective: the image-text loader's counters summed over data ranks (``source`` None on
    ranks that do not report). Rank 0 logs them and returns a ``data`` record."""
    stats = source.stats() if source is not None else {}
    counts = torch.tensor([float(stats.get(k, 0)) for k in COUNTERS], dtype=torch.float64, device=dims.device)
    dist.all_reduce(counts)
    if not dims.is_main:
        return []
    total = {k: int(v) for k, v in zip(COUNTERS, counts.tolist())}
    logger.info("data at step %d: %s", step, describe_stats(total))
    bad = sum(total[k] for k in BAD)
    return [{"kind": "data", "step": step, **total, "bad": bad, "bad_fraction": bad / max(total["read"], 1)}]


def check_tensor_peers(keys: list[str], group, device) -> None:
    """Collective over a tensor-parallel group: its ranks must have read the same batch (they
    compute one model replica's shards); raise, naming the mismatch, if not."""
    mine = torch.tensor([zlib.crc32("\n".join(keys).encode())], dtype=torch.int64, device=device)
    peers = [torch.zeros_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(peers, mine, group=group)
    if len({int(p) for p in peers}) > 1:
        raise RuntimeError("the ranks of a tensor-parallel group read different batches (key checksums "
                           f"{[int(p) for p in peers]}); the loader must split by data-parallel rank")


def gather_positions(source, dims) -> dict:
    """Collective: every data rank's loader position, keyed by data rank (for the checkpoint)."""
    gathered = [None] * dims.world_size
    dist.all_gather_object(gathered, source.state_dict() if source is not None else None)
    return {str(s["data_rank"]): s for s in gathered if s is not None}
