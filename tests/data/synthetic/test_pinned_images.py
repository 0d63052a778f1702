"""Every generator's images are pinned, byte for byte, as the code rendered them when the
speed work of issue 22 began: shards' bytes are part of reproducibility (a dataset written
today must be the dataset written next year), so a faster renderer must render the same
images. Three (class, instance) pairs of a 10-class set, seed 7, at 64 px, and at 224 px
(the size the speed targets are set at) for the point and contour renderers."""
import hashlib

import pytest

from vitscale.data.synthetic import create_generator, list_generators

PINNED = {
    ("bezier", 64): "907e4a149c066bbe64d629936ed1f659645f455bc03927dabccda05c8a568830",
    ("dead_leaves", 64): "4d69a6ab1857bba3986f49500a90bb54da185bfdde2df0ec97ba9bfb9f8b8731",
    ("exfractal", 64): "3f69333c89f3ada3c4b9c31146de1005d38b38cd1546bcc5a5bf703c9080af79",
    ("exfractal", 224): "2478f373359dc3e132086e2058fcb6788db16eb3fd986d06efd4b99b85e928e1",
    ("fractal", 64): "0115678da3141fa86885192dabf804de470b8c0621bd27d68c6bdac9ec41fb4d",
    ("fractal", 224): "7359c886828f46f1f427b89a13b220235b7ff83dbdd0fc1893a920da4fab4712",
    ("gratings", 64): "f14e072d93f39b5edf396c8c4b9da5b8ee10742004a1f5947c2ee1b298135b4d",
    ("perlin", 64): "1f13e24bfc22b3f76ec90dec0c983ce40ee83a2ebefae58fbdf1718036c2ecd7",
    ("rcdb", 64): "4c215a6173fbaf7ee927844d1546498a91ef091d3d2791e004c743151d678d4d",
    ("rcdb", 224): "788349d5141d4e96cc4559eabc8c4d9d6c24c6cd357fabbb99f5497caed73a6e",
    ("visual_atom", 64): "b57215d7f673bd25557f398a16dbbc0229116e74017873f52ab790f56f6714e2",
    ("visual_atom", 224): "34c6f1614c48d103bca6be778b664192d451e6b69776fd1e3fd531dfbd736668",
}


def test_every_generator_is_pinned():
    assert {name for name, _ in PINNED} == set(list_generators())


@pytest.mark.parametrize("name, size", sorted(PINNED))
def test_images_are_the_pinned_bytes(name, size):
    g = create_generator(name, 10, size, seed=7)
    got = hashlib.sha256(b"".join(g.render(label, i).tobytes() for label, i in ((0, 0), (3, 5), (9, 2)))).hexdigest()
    assert got == PINNED[(name, size)], f"{name} at {size} px no longer renders the pinned images"
