"""NaViT packing stage: native aspect ratio at bounded (sampled) resolution, fixed-length
sequences, every kept patch of every image present once, token dropping, and a stage
that turns any image loader into packed micro-batches."""
import random

import pytest
import torch

from vitscale.data.packing import native_size, normalize_patches, pack_batches, pack_sequences, patchify_image
from vitscale.data.transforms import normalize


def _samples(n=12, seed=0):
    rng = random.Random(seed)
    for i in range(n):
        h, w = rng.choice([16, 24, 40, 64]), rng.choice([8, 32, 48, 64])
        yield torch.randint(0, 256, (3, h, w), dtype=torch.uint8), i


def test_native_size_keeps_aspect_ratio_within_the_bound():
    assert native_size(64, 32, 8, 32, 32) == (32, 16)  # shrunk to the bound, 2:1 kept
    assert native_size(16, 24, 8, 32, 32) == (16, 24)  # small images keep their size
    rng = random.Random(0)
    sizes = {native_size(64, 64, 8, 64, 16, rng) for _ in range(200)}
    assert min(max(s) for s in sizes) >= 16 and max(max(s) for s in sizes) <= 64 and len(sizes) > 3


def test_patches_are_the_images_pixels_at_their_grid_positions():
    image = torch.arange(3 * 16 * 24, dtype=torch.float32).reshape(3, 16, 24)
    patches, coords = patchify_image(image, 8)
    assert patches.shape == (6, 3 * 64) and coords.tolist() == [[0, 0], [0, 1], [0, 2], [1, 0], [1, 1], [1, 2]]
    torch.testing.assert_close(patches[4].reshape(3, 8, 8), image[:, 8:16, 8:16])


@pytest.mark.parametrize("token_drop", [0.0, 0.5])
def test_sequences_hold_every_image_once_in_fixed_length(token_drop):
    seqs = list(pack_sequences(_samples(), patch_size=8, seq_len=64, max_images=4, max_size=64, min_size=16,
                               token_drop=token_drop, seed=1))
    labels = [label for s in seqs for label in s["labels"].tolist() if label >= 0]
    assert labels == list(range(12))  # in order, none lost, none twice
    for s in seqs:
        assert s["patches"].shape == (64, 192) and s["segments"].shape == (64,)
        segs = s["segments"]
        used = int((segs > 0).sum())
        assert (segs[:used] > 0).all() and (segs[used:] == 0).all()  # images first, then padding
        assert segs[:used].diff().ge(0).all()  # each image's tokens contiguous
        k = int(segs.max())
        assert (s["labels"][:k] >= 0).all() and (s["labels"][k:] == -1).all() and k <= 4
        for image in range(1, k + 1):
            rc = s["coords"][segs == image]
            assert len(rc) > 0 and rc.max() < 8 and len({tuple(x) for x in rc.tolist()}) == len(rc)
    if token_drop:
        # a 64 x 64 image has 64 patches; with half dropped 32 remain: no sequence can be full of one image
        assert all(int((s["segments"] == 1).sum()) <= 32 for s in seqs)


def test_pack_batches_turns_an_image_loader_into_packed_micro_batches():
    batches = [(torch.randint(0, 256, (4, 3, 32, 32), dtype=torch.uint8), torch.arange(4) + 4 * i) for i in range(6)]
    out = list(pack_batches(batches, 2, patch_size=8, seq_len=40, max_images=3, max_size=32, seed=None))
    patches, coords, segments, labels = out[0]
    assert patches.shape == (2, 40, 192) and coords.shape == (2, 40, 2) and labels.shape == (2, 3)
    assert labels[0].tolist() == [0, 1, -1]  # two 16-patch images fit in 40 tokens, a third does not
    # patches normalise as the whole images would
    mean, std = torch.tensor([0.4, 0.5, 0.6]), torch.tensor([0.2, 0.25, 0.3])
    want = patchify_image(normalize(batches[0][0][:1], mean, std)[0], 8)[0]
    torch.testing.assert_close(normalize_patches(patches[0, :16], mean, std), want)


def test_seq_len_too_short_for_the_largest_image_is_a_clear_error():
    with pytest.raises(ValueError, match="seq_len=8 tokens cannot hold one 32 px image .*raise seq_len to 16"):
        next(pack_sequences(_samples(), patch_size=8, seq_len=8, max_images=2, max_size=32))
