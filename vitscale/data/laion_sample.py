"""A small image-caption shard set in img2dataset's exact output format, from synthetic images.

No real LAION data can be downloaded on a test machine, so ``vitscale-synth laion-sample``
writes what img2dataset would have written for a list of (url, caption) rows, with
synthetic images whose captions name their class (``vitscale.data.captions.describe``)::

    OUT/00000.tar             {key}.jpg  {key}.txt  {key}.json   (successful downloads only)
    OUT/00000.parquet         every row: url, caption, key, status, error_message, width, height,
                              original_width, original_height, exif, sha256, + similarity, label
    OUT/00000_stats.json      count, successes, failed_to_download, failed_to_resize, ...
    OUT/val/...               the same for held-out samples (retrieval and zero-shot evaluation)
    OUT/classnames.txt        one class name per line (zero-shot classification)
    OUT/templates.txt         prompt templates, '{}' standing for the class name

Keys are img2dataset's: shard index (5 digits) + index in the shard (4 digits). A few rows
per shard are failed downloads (in the parquet, not in the tar), as in real runs; ``label``
and ``similarity`` are additional columns (img2dataset's ``--save_additional_columns``).
Everything is a pure function of the arguments; files appear atomically.
"""
from __future__ import annotations

import hashlib
import json
import os
import tarfile
from pathlib import Path


from vitscale.data.captions import class_phrase, describe
from vitscale.data.shards import encode_image
from vitscale.data.tars import add_member
from vitscale.files import replacing, write_text_atomic
from vitscale.data.synthetic import create_generator, instance_rng

FAILED_EVERY = 17  # every 17th row of a shard is a failed download
SIMILARITY_STREAM = 0x51A1
TEMPLATES = ("{}", "a {}")  # the captions read "a <adjective> <colour> <class phrase>"


def _rows(source: str, classes: int, size: int, seed: int, indices: range, shard: int, generator):
    for i, index in enumerate(indices):
        label, instance = index % classes, index // classes
        key = f"{shard:05d}{i:04d}"
        url = f"https://example.invalid/{source}/{label}/{instance}.jpg"
        rng = instance_rng(seed, label, instance, stream=SIMILARITY_STREAM)
        original = int(size * (1 + rng.integers(4)))  # the size before img2dataset resized it
        similarity = round(float(rng.uniform(0.2, 0.4)), 4)
        if i % FAILED_EVERY == FAILED_EVERY - 1:
            yield {"url": url, "caption": None, "key": key, "status": "failed_to_download",
                   "error_message": "HTTP Error 404: Not Found", "width": None, "height": None,
                   "original_width": None, "original_height": None, "exif": None, "sha256": None,
                   "similarity": similarity, "label": label}, None, None
            continue
        image = generator.render(label, instance)
        data = encode_image(image, "jpg")
        caption = describe(source, label, instance, seed, image)
        yield {"url": url, "caption": caption, "key": key, "status": "success", "error_message": None,
               "width": size, "height": size, "original_width": original, "original_height": original,
               "exif": "{}", "sha256": hashlib.sha256(data).hexdigest(), "similarity": similarity,
               "label": label}, data, caption


def _write_shard(out: Path, shard: int, rows) -> int:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table, successes = [], 0
    tmp = out / f"{shard:05d}.tar.partial"
    with open(tmp, "wb") as f:
        with tarfile.open(fileobj=f, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for row, data, caption in rows:
                table.append(row)
                if data is None:
                    continue
                successes += 1
                meta = {k: row[k] for k in ("url", "caption", "key", "status", "error_message", "width", "height",
                                            "original_width", "original_height", "exif", "sha256", "similarity",
                                            "label")}
                add_member(tar, f"{row['key']}.jpg", data)
                add_member(tar, f"{row['key']}.txt", caption.encode())
                add_member(tar, f"{row['key']}.json", json.dumps(meta, indent=4).encode())
        f.flush()
        os.fsync(f.fileno())
    with replacing(out / f"{shard:05d}.parquet") as parquet:
        pq.write_table(pa.Table.from_pylist(table), str(parquet))
    failed = len(table) - successes
    write_text_atomic(out / f"{shard:05d}_stats.json", json.dumps({
        "count": len(table), "successes": successes, "failed_to_download": failed, "failed_to_resize": 0,
        "duration": 0.0, "start_time": 0.0, "end_time": 0.0,
        "status_dict": {"success": successes, **({"HTTP Error 404: Not Found": failed} if failed else {})},
    }, indent=4) + "\n")
    os.replace(tmp, out / f"{shard:05d}.tar")  # the tar last: a listed tar always has its stats
    return successes


def write_laion_sample(out: str | Path, source: str = "gratings", classes: int = 10, instances: int = 64,
                       val_instances: int = 16, size: int = 64, shard_size: int = 80, seed: int = 0) -> dict:
    """Write the sample set (module docstring). Rows ``classes * instances`` go to ``OUT`` and
    ``classes * val_instances`` more (instances after the training ones) to ``OUT/val``.

    Returns:
        {"train": successes, "val": successes, "shards": train shards, "val_shards": val shards}.
    """
    out = Path(out)
    generator = create_generator(source, classes, size, seed)
    result = {}
    for split, folder, first, count in (("train", out, 0, instances), ("val", out / "val", instances, val_instances)):
        folder.mkdir(parents=True, exist_ok=True)
        rows = range(first * classes, (first + count) * classes)
        shards = [rows[i:i + shard_size] for i in range(0, len(rows), shard_size)]
        result[split] = sum(_write_shard(folder, s, _rows(source, classes, size, seed, idx, s, generator))
                            for s, idx in enumerate(shards))
        result["shards" if split == "train" else "val_shards"] = len(shards)
    names = "".join(class_phrase(source, label) + "\n" for label in range(classes))
    for folder in (out, out / "val"):
        write_text_atomic(folder / "classnames.txt", names)
        write_text_atomic(folder / "templates.txt", "".join(t + "\n" for t in TEMPLATES))
    return result
