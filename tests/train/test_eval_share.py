"""Evaluation reads only its share (issue 19): each data rank parses the tar members of its own
samples (every world-th), not every sample's; the shares together are every sample once, as one
process reads them. Zero-shot / retrieval data (``evaluate.eval_samples``) and a classifier's
labelled test shards (``downstream.heldout_batches``)."""
import io
import tarfile

import numpy as np
import pytest
from PIL import Image

from vitscale.data.downstream import heldout_batches
from vitscale.data.laion_sample import write_laion_sample
from vitscale.train.evaluate import eval_samples

from tests.tarfiles import count_tar_members


@pytest.fixture(scope="module")
def val_set(tmp_path_factory):
    out = tmp_path_factory.mktemp("laion")
    write_laion_sample(out, classes=4, instances=2, val_instances=15, size=32, shard_size=16)
    return out / "val"


def _fingerprint(item):
    image, box, label, caption = item
    return (image.tobytes(), box, label, caption)


@pytest.mark.parametrize("max_samples", [0, 25])
def test_eval_ranks_read_only_their_share(val_set, monkeypatch, max_samples):
    whole_parsed = count_tar_members(monkeypatch)
    whole = [_fingerprint(x) for x in eval_samples(str(val_set), 36, 0, 1, max_samples)]
    assert len(whole) == (max_samples or 60) and whole_parsed["members"] == 3 * len(whole)  # jpg, txt, json
    union = []
    for rank in range(3):
        parsed = count_tar_members(monkeypatch)
        mine = [_fingerprint(x) for x in eval_samples(str(val_set), 36, rank, 3, max_samples)]
        assert mine == whole[rank::3]
        # only this rank's samples are parsed: 3 members each, and a third of the bytes
        assert parsed["members"] == 3 * len(mine)
        assert parsed["bytes"] < 0.4 * whole_parsed["bytes"]
        union += mine
    assert sorted(union) == sorted(whole)


def test_classifier_test_shards_read_only_their_share(tmp_path, monkeypatch):
    rng = np.random.default_rng(1)
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        for i in range(11):
            buf = io.BytesIO()
            Image.fromarray(rng.integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(buf, format="PNG")
            for ext, data in (("png", buf.getvalue()), ("cls", str(i % 3).encode())):
                info = tarfile.TarInfo(f"{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    source = str(tmp_path / "00000.tar")
    labels = {}
    for rank in range(2):
        parsed = count_tar_members(monkeypatch)
        labels[rank] = [int(x) for _, batch in heldout_batches(source, 32, 4, rank, 2) for x in batch]
        assert parsed["members"] == 2 * len(labels[rank])  # png + cls of its own samples only
    assert labels == {0: [i % 3 for i in range(0, 11, 2)], 1: [i % 3 for i in range(1, 11, 2)]}
