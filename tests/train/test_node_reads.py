"""model.init (and reshard, through the same helper) read the weights once per node, not once per
rank (``train/node_reads.py``): two gloo processes, counted reads, and the loaded tensor shards
checked against the single-process load of the same file (the whole model's forward)."""
import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from tests.conftest import run_in_gloo
from vitscale.models import create_model

MODEL = dict(img_size=32, num_classes=10, depth=2, num_heads=4)


def _tiny():
    return create_model("vit_tiny_patch16", **MODEL).eval()


def _check_model_init(rank: int, world: int) -> None:
    import vitscale.train.initial_weights as iw
    import vitscale.train.node_reads as nr
    from vitscale.models.tensor_parallel import parallelize_vit

    out, weights = Path(os.environ["NODE_READS_OUT"]), os.environ["NODE_READS_WEIGHTS"]
    one_node = os.environ["NODE_READS_LAYOUT"] == "one_node"
    counts = {"whole_reads": 0, "elements_taken": 0}
    read = iw.read_state_dict

    def counted_read(path):
        counts["whole_reads"] += 1
        return read(path)

    get = nr.LazyState.__getitem__

    def counted_get(self, key):
        value = get(self, key)
        counts["elements_taken"] += value.numel()
        return value

    iw.read_state_dict, nr.LazyState.__getitem__ = counted_read, counted_get
    # one node: local ranks 0 and 1; two nodes: each process is its node's local rank 0
    dims = SimpleNamespace(local_rank=rank if one_node else 0, node=0 if one_node else rank,
                           device=torch.device("cpu"))
    torch.manual_seed(1000 + rank)  # other starting weights on each rank: the file must replace them
    model = _tiny()
    parallelize_vit(model, rank, world, dist.group.WORLD)
    iw.load_initial_weights(model, weights, dims=dims)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        logits = model(x)
    reference = _tiny()  # the single-process load of the same file
    reference.load_state_dict(load_file(weights))
    with torch.no_grad():
        expected = reference(x)
    assert torch.allclose(logits, expected, rtol=1e-5, atol=1e-6), (logits - expected).abs().max()
    left = [p.name for f in nr.node_folders() for p in f.glob("vitscale-*-model_init-*.safetensors")]
    dist.barrier()
    counts["copies_left"] = left
    (out / f"rank{rank}.json").write_text(json.dumps(counts))


@pytest.mark.parametrize("layout", ["one_node", "two_nodes"])
def test_model_init_reads_once_per_node_and_loads_the_single_process_weights(tmp_path, monkeypatch, layout):
    torch.manual_seed(0)
    whole = _tiny().state_dict()
    save_file(whole, tmp_path / "w.safetensors")
    monkeypatch.setenv("NODE_READS_OUT", str(tmp_path))
    monkeypatch.setenv("NODE_READS_WEIGHTS", str(tmp_path / "w.safetensors"))
    monkeypatch.setenv("NODE_READS_LAYOUT", layout)
    run_in_gloo(_check_model_init, 2)
    counts = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    reads = [c["whole_reads"] for c in counts]
    # one read of the file per node: rank 0 only on one node; each process on two nodes
    assert reads == ([1, 0] if layout == "one_node" else [1, 1])
    # Each tensor rank takes the tensors its shard needs and no other; the blocks' linears are halved only
    # after they are taken, so a rank takes the whole model's elements once (never a second copy).
    total = sum(v.numel() for v in whole.values())
    assert [c["elements_taken"] for c in counts] == [total, total]
    assert all(c["copies_left"] == [] for c in counts)  # the node copy is removed


class Payload:
    """Unpickled with weights_only=False, this opens (creates) ``path``: code run by a load."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _check_refusal(rank: int, world: int) -> None:
    import vitscale.train.initial_weights as iw
    from vitscale.train.safe_load import UnsafeCheckpoint

    weights = os.environ["NODE_READS_WEIGHTS"]
    dims = SimpleNamespace(local_rank=rank, node=0, device=torch.device("cpu"))  # one node: rank 0 reads
    with pytest.raises(UnsafeCheckpoint) as refused:
        iw.load_initial_weights(_tiny(), weights, dims=dims)
    # every rank, the reader's peer too, ends with the refusal itself, naming the file
    assert str(refused.value.path) == weights and "other than tensors and plain data" in str(refused.value)
    dist.barrier()


def test_a_refused_file_is_refused_on_every_rank_of_the_node(tmp_path, monkeypatch):
    # model.init of a torch file whose unpickling would run code: the node's reader refuses it
    # (safe_load) and its peer raises the same refusal (the launcher's exit code: a refused input).
    torch.save({"module": Payload(tmp_path / "pwned")}, tmp_path / "evil.pt")
    monkeypatch.setenv("NODE_READS_WEIGHTS", str(tmp_path / "evil.pt"))
    run_in_gloo(_check_refusal, 2)
    assert not (tmp_path / "pwned").exists()


def test_a_pipeline_stage_takes_only_its_layers_tensors_from_the_node_copy(tmp_path):
    # The lazy node copy hands a rank the tensors its piece asks for, nothing else: block 1 of a 2-block
    # ViT takes block 1's 12 tensors (its elements), not the embedding's, block 0's or the head's.
    from vitscale.models.interop import shard_state_dict
    from vitscale.train.node_reads import LazyState

    torch.manual_seed(0)
    model = _tiny()
    save_file(model.state_dict(), tmp_path / "w.safetensors")
    lazy = LazyState(tmp_path / "w.safetensors")
    piece = shard_state_dict(lazy, model.blocks[1], prefix="blocks.1")
    assert lazy.tensors_read == len(piece) == len(model.blocks[1].state_dict())
    for key, value in model.blocks[1].state_dict().items():
        assert torch.equal(piece[key], value), key
    assert lazy.shape("pos_embed") == tuple(model.pos_embed.shape) and lazy.tensors_read == len(piece)
