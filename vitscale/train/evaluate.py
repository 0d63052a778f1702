"""Evaluation, during training or from a checkpoint: zero-shot classification and image-text
retrieval of a CLIP, top-1 / top-5 of a classifier on a test split, linear probes.

- **Zero-shot** (CLIP's protocol, as open_clip's ``build_zero_shot_classifier``): every
  class name goes through every prompt template; the text embeddings are normalised,
  averaged per class and normalised again; the (E, classes) matrix is the classifier of
  normalised image embeddings; top-1 / top-5. Class names and templates default to the
  ones next to the data (``classnames.txt`` / ``templates.txt``), else ImageNet's class
  names and OpenAI's 80 templates as open_clip ships them.
- **Retrieval**: image->text and text->image recall@1/5/10 over held-out image-caption
  shards (each image's own caption is its one positive).

Data: a labelled webdataset (image + ``.cls``, or a ``label`` field in ``.json``, as
``vitscale-synth laion-sample`` writes), an image folder (one sub-folder per class) for
zero-shot, img2dataset shards for retrieval. Images get CLIP's eval transform (shorter
side resized, centre crop) through the same canvas + device crop as training.

With a process group, each data rank evaluates its share (every ``data_world``-th
sample), reading only that share's bytes, and the counts are summed; ranks keep stepping together (a rank out of samples
runs a dummy batch), since tensor-parallel and ZeRO-3 forwards are collective.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vitscale.data.captions import CaptionTokenizer
from vitscale.data.downstream import downstream_dataset, heldout_batches, timm_transform
from vitscale.data.laion import IMAGE_EXTS, center_box, decode_image, fit_canvas, resolve_sources
from vitscale.data.tars import shard_share
from vitscale.data.synthetic_loader import collate_labelled
from vitscale.data.transforms import crop_resize, normalize
from vitscale.experiment import Experiment
from vitscale.train.checkpoint import find_checkpoint, load_run, read_checkpoint

logger = logging.getLogger(__name__)

RECALL_AT = (1, 5, 10)


# -- class names and templates ----------------------------------------------------------------------

def _beside(data: str, name: str) -> Path | None:
    first = next(iter(_expand_data(data)), data)
    for folder in (Path(data), Path(first).parent):
        if folder.is_dir() and (folder / name).is_file():
            return folder / name
    return None


def load_classnames(spec: str | None, data: str) -> list[str]:
    """Class names: a file (one per line), ``imagenet``, or (None) ``classnames.txt`` beside
    the data, an image folder's sub-folder names, else ImageNet's."""
    if spec is None:
        found = _beside(data, "classnames.txt")
        if found is not None:
            spec = str(found)
        elif Path(data).is_dir() and not any(Path(data).glob("*.tar")):
            return [p.name.replace("_", " ") for p in sorted(Path(data).iterdir()) if p.is_dir()]
        else:
            spec = "imagenet"
    if spec == "imagenet":
        from open_clip.zero_shot_metadata import IMAGENET_CLASSNAMES

        return list(IMAGENET_CLASSNAMES)
    return [line.strip() for line in Path(spec).read_text().splitlines() if line.strip()]


def load_templates(spec: str | None, data: str) -> list[Callable[[str], str]]:
    """Prompt templates: a file ('{}' per line for the class name), ``openai`` (80), ``simple``,
    or (None) ``templates.txt`` beside the data, else ``openai``."""
    if spec is None:
        found = _beside(data, "templates.txt")
        spec = str(found) if found is not None else "openai"
    if spec in ("openai", "simple"):
        from open_clip.zero_shot_metadata import OPENAI_IMAGENET_TEMPLATES, SIMPLE_IMAGENET_TEMPLATES

        return list(OPENAI_IMAGENET_TEMPLATES if spec == "openai" else SIMPLE_IMAGENET_TEMPLATES)
    lines = [line.rstrip("\n") for line in Path(spec).read_text().splitlines() if "{}" in line]
    if not lines:
        raise ValueError(f"templates file {spec} has no line with '{{}}' (where the class name goes)")
    return [line.format for line in lines]


# -- the classifier ---------------------------------------------------------------------------------

@torch.no_grad()
def zero_shot_classifier(model, tokenizer, classnames: list[str], templates: list[Callable[[str], str]],
                         device: torch.device | str = "cpu", batch_size: int = 256) -> torch.Tensor:
    """(E, classes): per class, the normalised mean of its normalised template embeddings.

    ``model.encode_text(tokens)`` gives text embeddings (ours and open_clip's alike);
    ``tokenizer(list of str)`` gives (N, context) token ids.
    """
    texts = [template(name) for name in classnames for template in templates]
    embeddings = []
    for i in range(0, len(texts), batch_size):
        tokens = tokenizer(texts[i:i + batch_size]).to(device)
        embeddings.append(F.normalize(model.encode_text(tokens).float(), dim=-1))
    per_class = torch.cat(embeddings).view(len(classnames), len(templates), -1).mean(dim=1)
    return F.normalize(per_class, dim=-1).T


# -- evaluation data --------------------------------------------------------------------------------

def _expand_data(data: str) -> list[str]:
    if Path(data).is_dir():
        return sorted(str(p) for p in Path(data).glob("*.tar"))
    return [u for s in resolve_sources(data) for u in s.urls]


def _label(sample: dict) -> int | None:
    if "cls" in sample:
        return int(sample["cls"])
    if "json" in sample:
        value = json.loads(sample["json"]).get("label")
        return int(value) if value is not None else None
    return None


def eval_samples(data: str, canvas: int, rank: int = 0, world: int = 1, max_samples: int = 0,
                 counts: dict | None = None) -> Iterator[tuple[np.ndarray, tuple, int | None, str | None]]:
    """Every ``world``-th sample (from ``rank``) of ``data`` in order (of its first ``max_samples``
    when > 0): (canvas image (3, c, c) uint8, central box, label or None, caption or None). Only
    this share's bytes are read (``tars.shard_share``: each local shard's samples seeked to).
    Undecodable samples, and (counted by one rank) unreadable shards, are counted in
    ``counts['bad']`` and skipped."""
    counts = counts if counts is not None else {}
    counts.setdefault("bad", 0)
    if Path(data).is_dir() and not any(Path(data).glob("*.tar")):  # an image folder
        classes = sorted(p for p in Path(data).iterdir() if p.is_dir())
        files = [(f, label) for label, folder in enumerate(classes) for f in sorted(folder.iterdir())
                 if f.suffix.lower().lstrip(".") in IMAGE_EXTS]
        files = files[:max_samples] if max_samples else files
        raw = ({"__key__": str(f), f.suffix.lower().lstrip("."): f.read_bytes(), "cls": str(label).encode()}
               for f, label in files[rank::world])
    else:
        def unreadable(url: str, exc: Exception) -> None:
            counts["bad"] += 1
            logger.warning("skipping the rest of shard %s: %s", url, exc)

        raw = shard_share(_expand_data(data), rank, world, max_samples, unreadable)
    for sample in raw:
        try:
            ext = next(e for e in IMAGE_EXTS if e in sample)
            image, _ = fit_canvas(decode_image(sample[ext], ext, canvas), canvas)
        except Exception:  # noqa: BLE001 -- a bad sample is counted, never a crash
            counts["bad"] += 1
            continue
        out = np.zeros((3, canvas, canvas), np.uint8)
        h, w = image.shape[:2]
        out[:, :h, :w] = image.transpose(2, 0, 1)
        caption = sample["txt"].decode("utf-8", "replace").strip() if "txt" in sample else None
        yield out, center_box(w, h), _label(sample), caption


def _batches(samples: Iterator, batch_size: int) -> Iterator[list]:
    batch = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _lockstep(batches: Iterator[list], dummy: list, device) -> Iterator[tuple[list, bool]]:
    """(batch, real): all ranks step together until every rank is out of batches."""
    import torch.distributed as dist

    distributed = dist.is_available() and dist.is_initialized()
    for batch in batches:
        if distributed:
            flag = torch.ones(1, device=device)  # NCCL reduces device tensors only
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        yield batch, True
    if distributed:
        while True:
            flag = torch.zeros(1, device=device)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            if flag.item() == 0:
                return
            yield dummy, False


class _Images:
    """Canvas batches -> normalised model inputs on the device (CLIP's eval transform)."""

    def __init__(self, image_size: int, mean, std, device, dtype):
        self.size, self.device, self.dtype = image_size, torch.device(device), dtype
        self.mean = torch.tensor(mean, device=self.device)
        self.std = torch.tensor(std, device=self.device)

    def __call__(self, batch: list) -> torch.Tensor:
        images = torch.from_numpy(np.stack([b[0] for b in batch])).to(self.device)
        boxes = torch.tensor([(*b[1], 0.0) for b in batch], dtype=torch.float32)
        return normalize(crop_resize(images, boxes, self.size), self.mean, self.std, self.dtype)


def _dist_sum(values: list[float], device, contribute: bool = True) -> list[float]:
    """Sums over all ranks; ranks that only repeat another's samples (tensor / pipe peers) add 0."""
    import torch.distributed as dist

    t = torch.tensor(values, dtype=torch.float64, device=device) * float(contribute)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
    return t.tolist()


@torch.no_grad()
def zero_shot(model, tokenizer, data: str, image_size: int, mean, std, classnames: list[str],
              templates: list[Callable[[str], str]], device="cpu", dtype=torch.float32, batch_size: int = 64,
              canvas: int = 0, rank: int = 0, world: int = 1, max_samples: int = 0, contribute: bool = True) -> dict:
    """Top-1 / top-5 zero-shot accuracy of ``model`` on labelled ``data`` (module docstring).
    ``rank`` / ``world``: this data rank and their number; ``contribute``: False on ranks whose
    samples another rank counts (tensor-parallel peers)."""
    classifier = zero_shot_classifier(model, tokenizer, classnames, templates, device)
    images_of = _Images(image_size, mean, std, device, dtype)
    canvas = canvas or round(image_size * 8 / 7)
    counts: dict = {}
    dummy = [(np.zeros((3, canvas, canvas), np.uint8), (0, 0, canvas, canvas), 0, None)]
    top1 = top5 = n = 0
    k = min(5, len(classnames))
    for batch, real in _lockstep(_batches(eval_samples(data, canvas, rank, world, max_samples, counts), batch_size),
                                 dummy, device):
        logits = F.normalize(model.encode_image(images_of(batch)).float(), dim=-1) @ classifier
        if not real:
            continue
        labels = torch.tensor([b[2] for b in batch], device=logits.device)
        if (labels < 0).any() or (labels >= len(classnames)).any() or any(b[2] is None for b in batch):
            raise ValueError(f"{data}: a sample has no label in [0, {len(classnames)}) (.cls or json 'label'); "
                             f"{len(classnames)} class names were given")
        best = logits.topk(k, dim=-1).indices
        top1 += (best[:, 0] == labels).sum().item()
        top5 += (best == labels[:, None]).any(dim=-1).sum().item()
        n += len(batch)
    top1, top5, n, bad = _dist_sum([top1, top5, n, counts["bad"]], device, contribute)
    if n == 0:
        raise ValueError(f"{data}: no sample could be read for zero-shot evaluation")
    return {"task": "zeroshot", "top1": top1 / n, "top5": top5 / n, "samples": int(n), "classes": len(classnames),
            "bad_samples": int(bad)}


@torch.no_grad()
def retrieval(model, tokenizer, data: str, image_size: int, mean, std, device="cpu", dtype=torch.float32,
              batch_size: int = 64, canvas: int = 0, rank: int = 0, world: int = 1, max_samples: int = 0,
              contribute: bool = True) -> dict:
    """Image->text and text->image recall@1/5/10 over image-caption ``data`` (arguments as ``zero_shot``)."""
    import torch.distributed as dist

    images_of = _Images(image_size, mean, std, device, dtype)
    canvas = canvas or round(image_size * 8 / 7)
    counts: dict = {}
    dummy = [(np.zeros((3, canvas, canvas), np.uint8), (0, 0, canvas, canvas), None, "")]
    image_emb, text_emb = [], []
    for batch, real in _lockstep(_batches(eval_samples(data, canvas, rank, world, max_samples, counts), batch_size),
                                 dummy, device):
        if real and any(b[3] is None for b in batch):
            raise ValueError(f"{data}: retrieval needs a caption (.txt) with every image")
        img = F.normalize(model.encode_image(images_of(batch)).float(), dim=-1)
        txt = F.normalize(model.encode_text(tokenizer([b[3] for b in batch]).to(device)).float(), dim=-1)
        if real:
            image_emb.append(img.cpu())
            text_emb.append(txt.cpu())
    mine = (torch.cat(image_emb), torch.cat(text_emb)) if image_emb and contribute else None
    if dist.is_available() and dist.is_initialized():
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        pairs = [g for g in gathered if g is not None]
    else:
        pairs = [mine] if mine is not None else []
    if not pairs:
        raise ValueError(f"{data}: no sample could be read for retrieval")
    images, texts = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
    sim = images @ texts.T  # (N, N); the diagonal holds the true pairs
    target = torch.arange(len(sim))
    out = {"task": "retrieval", "samples": len(sim),
           "bad_samples": int(_dist_sum([counts["bad"]], device, contribute)[0])}
    for direction, scores in (("image_to_text", sim), ("text_to_image", sim.T)):
        rank_of_true = (scores > scores[target, target][:, None]).sum(dim=1)  # how many beat the true pair
        for k in RECALL_AT:
            out[f"{direction}_R@{k}"] = (rank_of_true < k).float().mean().item()
    return out


def evaluate_clip(model, tokenizer, cfg, device, dtype, rank: int = 0, world: int = 1, contribute: bool = True) -> dict:
    """The evaluations ``cfg.eval`` asks for (zeroshot and / or retrieval), as one flat dict."""
    e, d = cfg.eval, cfg.data
    was_training = model.training
    model.eval()
    out: dict = {}
    try:
        if e.zeroshot:
            res = zero_shot(model, tokenizer, e.zeroshot, d.image_size, d.mean, d.std,
                            load_classnames(e.classnames, e.zeroshot), load_templates(e.templates, e.zeroshot),
                            device, dtype, e.batch_size, d.canvas, rank, world, e.max_samples, contribute)
            out.update({f"zeroshot_{k}": v for k, v in res.items() if k != "task"})
        if e.retrieval:
            res = retrieval(model, tokenizer, e.retrieval, d.image_size, d.mean, d.std, device, dtype, e.batch_size,
                            d.canvas, rank, world, e.max_samples, contribute)
            out.update({f"retrieval_{k}": v for k, v in res.items() if k != "task"})
    finally:
        model.train(was_training)
    return out


# -- classifiers: top-1 / top-5 on a test split, linear probe --------------------------------------

def _topk_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[int, int]:
    best = logits.topk(min(5, logits.shape[-1]), dim=-1).indices
    return int((best[:, 0] == labels).sum()), int((best == labels[:, None]).any(dim=-1).sum())


@torch.no_grad()
def classify(model, data: str, image_size: int, mean, std, device="cpu", dtype=torch.float32, batch_size: int = 64,
             rank: int = 0, world: int = 1, contribute: bool = True) -> dict:
    """Top-1 / top-5 accuracy (%) of a classifier on the test split ``data`` (``digits``, an
    image folder or labelled shards; ``vitscale.data.downstream``), each data rank on its
    share, ranks stepping together (``_lockstep``); ``contribute`` as for ``zero_shot``."""
    was_training = model.training
    model.eval()
    mean, std = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    dummy = (torch.zeros(1, 3, image_size, image_size, dtype=torch.uint8), torch.zeros(1, dtype=torch.long))
    top1 = top5 = n = 0
    loss = 0.0
    for (images, labels), real in _lockstep(heldout_batches(data, image_size, batch_size, rank, world), dummy, device):
        logits = model(normalize(images.to(device), mean, std, dtype)).float()
        if real:
            labels = labels.to(device)
            hits1, hits5 = _topk_hits(logits, labels)
            top1, top5, n = top1 + hits1, top5 + hits5, n + len(labels)
            loss += float(torch.nn.functional.cross_entropy(logits, labels, reduction="sum"))
    model.train(was_training)
    top1, top5, n, loss = _dist_sum([top1, top5, n, loss], device, contribute)
    if n == 0:
        raise ValueError(f"data.test={data}: no test sample could be read")
    # loss: the softmax cross-entropy per test sample (the sweep's eval_loss, what scaling-law fits read)
    return {"top1": 100.0 * top1 / n, "top5": 100.0 * top5 / n, "loss": loss / n, "test_samples": int(n)}


@torch.no_grad()
def features(embed: Callable, data: str, train: bool, image_size: int, mean, std, device="cpu",
             batch_size: int = 64, max_samples: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Frozen features (N, D) = ``embed(normalised images)`` (a ViT's pooled pre-logits, a CLIP's
    image embeddings) and labels (N,) of a split of ``data`` through timm's test transform."""
    from torch.utils.data import IterableDataset

    dataset = downstream_dataset(data, image_size, train, timm_transform(image_size, False))
    if isinstance(dataset, IterableDataset):  # shards: read once, in order
        dataset.endless = False
    mean, std = torch.tensor(mean, device=device), torch.tensor(std, device=device)
    feats, labels = [], []
    for batch in _batches(iter(dataset), batch_size):
        images, target = collate_labelled(batch)
        x = normalize(images.to(device), mean, std)
        feats.append(embed(x).float().cpu().numpy())
        labels.append(target.numpy())
        if max_samples and sum(len(f) for f in feats) >= max_samples:
            break
    return np.concatenate(feats), np.concatenate(labels)


def linear_probe(embed: Callable, train_data: str, test_data: str, image_size: int, mean, std, device="cpu",
                 batch_size: int = 64, max_samples: int = 0, seed: int = 0) -> dict:
    """Linear probe on frozen features: an L2-regularised multinomial logistic regression
    (scikit-learn's L-BFGS, as in CLIP's linear-probe evaluation) fit on the train split's
    standardised features, top-1 / top-5 (%) on the test split. ``embed``: as for ``features``,
    of a model in eval mode."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    x_train, y_train = features(embed, train_data, True, image_size, mean, std, device, batch_size, max_samples)
    x_test, y_test = features(embed, test_data, False, image_size, mean, std, device, batch_size, max_samples)
    scaler = StandardScaler().fit(x_train)
    probe = LogisticRegression(max_iter=1000, random_state=seed).fit(scaler.transform(x_train), y_train)
    scores = probe.predict_proba(scaler.transform(x_test))  # (N, classes seen in training)
    classes = torch.as_tensor(probe.classes_)
    logits = torch.full((len(y_test), int(max(classes.max().item(), y_test.max())) + 1), -1.0)
    logits[:, classes] = torch.as_tensor(scores, dtype=torch.float32)
    top1, top5 = _topk_hits(logits, torch.as_tensor(y_test))
    return {"task": "linear-probe", "top1": 100.0 * top1 / len(y_test), "top5": 100.0 * top5 / len(y_test),
            "train_samples": len(y_train), "test_samples": len(y_test), "feature_dim": int(x_train.shape[1])}


def load_checkpoint_model(path: str | Path, step: int | str = "latest"):
    """(model on CPU in eval mode, the run's experiment) from a run folder or one of its checkpoint
    folders, of any layout (tensor / pipeline shards are merged, ZeRO-3 consolidated)."""
    path = Path(path)
    if (path / "config.yaml").is_file():
        run_dir = path
        folder, _ = find_checkpoint(run_dir, step)
    elif path.parent.name == "checkpoints" and (path.parent.parent / "config.yaml").is_file():
        run_dir, folder = path.parent.parent, path
    else:
        raise FileNotFoundError(f"{path} is neither a run folder (with config.yaml) nor a checkpoint folder "
                                "(RUN/checkpoints/stepNNNNNNNN)")
    run = load_run(run_dir)
    model = run.model.create()
    state = read_checkpoint(folder, run)
    model.load_state_dict({k: v.float() for k, v in state.items()})
    return model.eval(), run


# -- during training ----------------------------------------------------------------------------------

def tokenizer_of(exp: Experiment) -> CaptionTokenizer:
    """The tokenizer of a CLIP's text tower (open_clip's BPE for 49408-token towers)."""
    return CaptionTokenizer(exp.model.text.vocab_size, exp.model.text.context_length)


def evaluate_run(model, exp: Experiment, dims, dtype, ema=None) -> dict:
    """Collective: what a run evaluates during training, each data rank on its share: a CLIP's
    zero-shot / retrieval figures (``eval.*``), or a classifier's top-1 / top-5 on ``data.test`` and
    its EMA's (``ema_top1``, ...)."""
    cfg, contribute = exp.cfg, dims.tensor_rank == 0  # tensor peers repeat their data rank's samples
    if exp.model.kind == "clip":
        return evaluate_clip(model, tokenizer_of(exp), cfg, dims.device, dtype, dims.data_rank, dims.data, contribute)
    d, results = cfg.data, {}
    for prefix, net in (("", model), ("ema_", ema.module if ema is not None else None)):
        if net is not None:
            got = classify(net, d.test, d.image_size, d.mean, d.std, dims.device, dtype, cfg.eval.batch_size,
                           dims.data_rank, dims.data, contribute=contribute)
            results.update({f"{prefix}{k}": v for k, v in got.items()})
    return results
