"""``vitscale-eval``: zero-shot classification or image-text retrieval of a CLIP checkpoint, or a
linear probe on the frozen features of a ViT (or a CLIP's image tower).

    vitscale-eval RUN_DIR|CHECKPOINT_DIR --task zeroshot --data DATA [--classnames FILE|imagenet]
                  [--templates FILE|openai|simple] [--step N] [--batch-size B] [--max-samples N] [--out FILE]
    vitscale-eval RUN_DIR --task retrieval --data 'val/{00000..00001}.tar'
    vitscale-eval RUN_DIR --task linear-probe --data digits | --data TRAIN --test-data TEST

Checkpoints of every layout (ZeRO 0-3, tensor and pipeline shards) are merged into one
model first (``vitscale.train.checkpoint.read_checkpoint``); the evaluation runs in this one
process, on the GPU when there is one. Prints one JSON object (and writes it to --out); the
progress bars (images, and a zero-shot classifier's prompts) go to stderr, where it is a
terminal or with ``--progress``, with a total where the data says its size (an image folder,
shards with ``sizes.json`` / ``_stats.json``, ``--max-samples``).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch

from vitscale.progress import add_progress_flags, progress_bar


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitscale-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint", type=Path, help="run folder (its latest checkpoint) or RUN/checkpoints/stepNNNNNNNN")
    p.add_argument("--task", choices=("zeroshot", "retrieval", "linear-probe"), required=True)
    p.add_argument("--data", required=True, help="labelled shards / image folder (zeroshot) or image-caption "
                   "shards (retrieval): a folder, brace pattern or list file")
    p.add_argument("--test-data", help="linear-probe: the test split (image folder or labelled shards); default: "
                   "digits' own test split for --data digits")
    p.add_argument("--classnames", help="file (one per line) or 'imagenet'; default: classnames.txt beside the data")
    p.add_argument("--templates", help="file ('{}' per line), 'openai' or 'simple'; default: templates.txt beside "
                   "the data, else openai")
    p.add_argument("--step", default="latest", help="checkpoint step of a run folder (default latest)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--max-samples", type=int, default=0, help="evaluate the first N samples only (0 = all)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, help="also write the result JSON here")
    add_progress_flags(p)
    return p


def _sample_count(data: str, max_samples: int = 0) -> int | None:
    """Samples in ``data`` where known without reading it: an image folder's files, shards' sizes."""
    from vitscale.data.laion import IMAGE_EXTS, resolve_sources

    path = Path(data)
    try:
        if path.is_dir() and not any(path.glob("*.tar")):
            n = sum(1 for f in path.glob("*/*") if f.suffix.lower().lstrip(".") in IMAGE_EXTS)
        else:
            sources = resolve_sources(sorted(str(p) for p in path.glob("*.tar")) if path.is_dir() else data)
            sizes = [s.num_samples for s in sources]
            n = sum(sizes) if sizes and None not in sizes else None
    except Exception:  # noqa: BLE001 -- only the bar's total: the evaluation reports unreadable data itself
        n = None
    if n is None:
        return max_samples or None
    return min(n, max_samples) if max_samples else n


def _counted(fn, bar, before=None):
    """``fn(x, ...)`` that adds ``len(x)`` to ``bar`` (and first calls ``before()`` once)."""
    def wrapped(x, *args, **kwargs):
        nonlocal before
        if before is not None:
            before, first = None, before
            first()
        out = fn(x, *args, **kwargs)
        bar.update(len(x))
        return out
    return wrapped


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from vitscale.train.evaluate import load_checkpoint_model

    try:
        model, run = load_checkpoint_model(args.checkpoint, args.step if args.step == "latest" else int(args.step))
        if args.task == "linear-probe":
            result = _linear_probe(args, model, run)
        elif run.model.kind != "clip":
            raise ValueError(f"{args.checkpoint} holds a {run.model.name}, not a CLIP: zero-shot and retrieval "
                             "need text and image towers")
        else:
            result = _clip_task(args, model, run)
    except (ValueError, FileNotFoundError, OSError) as e:
        parser().exit(1, f"vitscale-eval: error: {e}\n")
    _report({"checkpoint": str(args.checkpoint), "data": args.data, **result}, args.out)
    return 0


def _clip_task(args, model, run) -> dict:
    """Zero-shot classification or retrieval of a CLIP."""
    from vitscale.train.evaluate import load_classnames, load_templates, retrieval, tokenizer_of, zero_shot

    tokenizer = tokenizer_of(run)
    model.to(args.device)
    d = run.cfg.data
    common = dict(device=args.device, batch_size=args.batch_size, canvas=d.canvas, max_samples=args.max_samples)
    with progress_bar(_sample_count(args.data, args.max_samples), f"eval: {args.task}", "img", args.progress) as bar:
        if args.task == "zeroshot":
            classnames = load_classnames(args.classnames, args.data)
            templates = load_templates(args.templates, args.data)
            with progress_bar(len(classnames) * len(templates), "eval: class prompts", "text", args.progress,
                              leave=False) as prompts:
                def images_start() -> None:  # the prompts are done: the images' clock starts now
                    prompts.close()
                    bar.reset(total=bar.total)

                model.encode_text = _counted(model.encode_text, prompts)
                model.encode_image = _counted(model.encode_image, bar, before=images_start)
                return zero_shot(model, tokenizer, args.data, d.image_size, d.mean, d.std, classnames, templates,
                                 **common)
        model.encode_image = _counted(model.encode_image, bar)
        return retrieval(model, tokenizer, args.data, d.image_size, d.mean, d.std, **common)


def _report(result: dict, out: Path | None) -> None:
    text = json.dumps(result, indent=2)
    print(text)
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text + "\n")


def _linear_probe(args, model, run) -> dict:
    """A linear probe on the frozen pooled features (a CLIP: its image embeddings; a CapPa: its image tower's
    class token, projected to the decoder's width)."""
    from vitscale.train.evaluate import linear_probe

    if args.test_data is None and args.data != "digits":
        raise ValueError("--task linear-probe needs --test-data (the test split) unless --data is digits")
    model.to(args.device)
    embed = (model.encode_image if run.model.kind in ("clip", "cappa")
             else (lambda x: model.forward_head(model.forward_features(x), True)))
    d = run.cfg.data
    with progress_bar(None, "eval: features (train, then test)", "img", args.progress) as bar:
        return linear_probe(_counted(embed, bar), args.data, args.test_data or args.data, d.image_size, d.mean,
                            d.std, device=args.device, batch_size=args.batch_size, max_samples=args.max_samples)


if __name__ == "__main__":
    sys.exit(main())
