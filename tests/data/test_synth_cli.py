"""``vitscale-synth``: writing over ranks and workers, resume after a kill, errors, search, preview, list."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vitscale.data import shards as sh
from vitscale.data.synthetic import create_generator, list_generators
from vitscale.tools import synth

ARGS = ["gratings", "--classes", "6", "--instances", "5", "--size", "32", "--shard-size", "7", "--seed", "2",
        "--no-progress"]  # 30 samples in 5 shards
LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "PMI_RANK", "PMI_SIZE",
                 "PMIX_RANK", "PMIX_SIZE", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_ID")


@pytest.fixture(autouse=True)
def single_process(monkeypatch):
    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)


def _shards(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.glob(sh.SHARD_GLOB))}


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("ref")
    assert synth.main([*ARGS, "--out", str(out)]) == 0
    return out


def test_writes_a_complete_dataset_and_a_rerun_changes_nothing(reference):
    info = json.loads((reference / sh.DATASET_FILE).read_text())
    assert (info["num_shards"], info["num_samples"], info["classes"], info["seed"]) == (5, 30, 6, 2)
    before = {p.name: p.stat().st_mtime_ns for p in reference.glob(sh.SHARD_GLOB)}
    assert synth.main([*ARGS, "--out", str(reference)]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in reference.glob(sh.SHARD_GLOB)} == before


def test_workers_give_the_same_bytes(reference, tmp_path):
    assert synth.main([*ARGS, "--out", str(tmp_path), "--workers", "2"]) == 0
    assert _shards(tmp_path) == _shards(reference)
    assert (tmp_path / sh.DATASET_FILE).read_text() == (reference / sh.DATASET_FILE).read_text()


@pytest.mark.parametrize("launcher", ["torchrun", "openmpi", "mpich", "srun"])
def test_ranks_from_the_launcher_environment_split_the_shards(reference, tmp_path, monkeypatch, launcher):
    names = {"torchrun": ("RANK", "WORLD_SIZE"), "openmpi": ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),
             "mpich": ("PMI_RANK", "PMI_SIZE"), "srun": ("SLURM_PROCID", "SLURM_NTASKS")}[launcher]
    if launcher == "srun":
        monkeypatch.setenv("SLURM_STEP_ID", "0")
    written = []
    for rank in (1, 0):
        monkeypatch.setenv(names[0], str(rank))
        monkeypatch.setenv(names[1], "2")
        assert synth.launcher_rank_world() == (rank, 2)
        assert synth.main([*ARGS, "--out", str(tmp_path)]) == 0
        written.append(sorted(_shards(tmp_path)))
    assert written[0] == ["shard-000001.tar", "shard-000003.tar"]
    assert not (tmp_path / sh.PENDING_FILE).exists()
    assert _shards(tmp_path) == _shards(reference)
    assert (tmp_path / sh.DATASET_FILE).read_text() == (reference / sh.DATASET_FILE).read_text()


@pytest.mark.distributed
def test_mpirun_ranks_write_the_single_process_dataset(reference, tmp_path):
    mpirun = Path(sys.executable).parent / "mpirun"
    assert mpirun.exists(), "no mpirun next to the interpreter: install the [mpi] extra (mpich)"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    cmd = [str(mpirun), "-np", "2", sys.executable, "-m", "vitscale.tools.synth", *ARGS, "--out", str(tmp_path)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "rank 1/2" in proc.stderr and _shards(tmp_path) == _shards(reference)
    assert (tmp_path / sh.DATASET_FILE).read_text() == (reference / sh.DATASET_FILE).read_text()


def _gratings_script(name: str, comment: str, render_first: str) -> str:
    """A vitscale-synth script registering ``name``: the gratings generator, ``render_first`` (a line of
    Python, indented for ``render``) run before each image is rendered."""
    return textwrap.dedent(f"""
        import os, sys, time
        from vitscale.data.synthetic import create_generator, register_generator
        from vitscale.tools.synth import main

        @register_generator("{name}")
        class Wrapped:
            # {comment}
            def __init__(self, num_classes, image_size, seed):
                self.inner = create_generator("gratings", num_classes, image_size, seed)
                self.num_classes, self.image_size, self.seed = num_classes, image_size, seed

            def params(self, label, instance):
                return self.inner.params(label, instance)

            def render(self, label, instance):
                {render_first}
                return self.inner.render(label, instance)

        sys.exit(main(sys.argv[1:]))
    """)


DYING = _gratings_script("dying_gratings", "gratings that kill their process at one image, as an OOM kill or a "
                         "node failure would", 'if os.environ.get("DIE_AT") == f"{label},{instance}": os._exit(9)')


@pytest.mark.parametrize("workers", [1, 2])
def test_a_run_killed_mid_shard_resumes_to_the_same_bytes(reference, tmp_path, workers):
    script = tmp_path / "dying.py"
    script.write_text(DYING)
    out = tmp_path / "out"
    cmd = [sys.executable, str(script), "dying_gratings", *ARGS[1:], "--out", str(out), "--workers", str(workers)]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    # Index 17 = label 5, instance 2: the fourth image of shard 2.
    died = subprocess.run(cmd, env={**env, "DIE_AT": "5,2"}, capture_output=True, text=True, timeout=120)
    assert died.returncode != 0
    if workers > 1:
        assert "worker process died" in died.stderr and "rerun the same command to resume" in died.stderr
    assert not (out / "shard-000002.tar").exists() and not (out / sh.DATASET_FILE).exists()
    if workers == 1:
        assert (out / "shard-000002.tar.partial").exists()  # cut off mid-shard
    resumed = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert resumed.returncode == 0, resumed.stderr
    assert _shards(out) == _shards(reference)  # shards hold images and parameters, not the generator's name
    assert not list(out.glob("*.partial")) and (out / sh.DATASET_FILE).exists()


@pytest.mark.parametrize("extra, message", [
    (["--classes", "0"], "--classes=0 must be at least 1"),
    (["--shard-size", "0"], "--shard-size=0 must be at least 1"),
    (["--size", "2"], "image_size >= 4"),
    (["--param", "noise"], "--param 'noise' is not key=value"),
    (["--param", "colour=red"], "generator 'gratings' does not take --param colour"),
    (["--instances", "6"], "other arguments (instances: 5 there, 6 now); use a new --out folder"),
    (["--param", "noise=0.2"], "generator_kwargs"),
])
def test_errors_are_one_clear_line(reference, tmp_path, capsys, extra, message):
    existing = "other arguments" in message or "generator_kwargs" in message
    out = reference if existing else tmp_path / "new"
    with pytest.raises(SystemExit) as e:
        synth.main([*ARGS, "--out", str(out), *extra])
    err = capsys.readouterr().err
    assert e.value.code == 1 and message in err and "Traceback" not in err
    assert existing or not out.exists()  # refused before writing anything


def test_unknown_generator_and_search_without_categories(tmp_path, capsys):
    with pytest.raises(SystemExit):
        synth.main(["gratngs", *ARGS[1:], "--out", str(tmp_path / "x")])
    assert "unknown synthetic generator 'gratngs'; did you mean gratings" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        synth.main(["search", "gratings", "--classes", "3", "--out", str(tmp_path / "c.json")])
    assert "has no category search" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit):
        synth.main([*ARGS, "--out", str(tmp_path / "file")])
    assert "is a file" in capsys.readouterr().err


def _searched_generator() -> str:
    for name in list_generators():
        try:
            if callable(getattr(create_generator(name, 2, 32, 0), "categories", None)):
                return name
        except ValueError:  # a generator that cannot be this small is not the one we look for
            continue
    raise AssertionError("no registered generator has a category search (fractal should)")


def test_search_then_write_with_categories_and_rerun_without_search(tmp_path, monkeypatch):
    name = _searched_generator()
    cats = tmp_path / "cats.json"
    assert synth.main(["search", name, "--classes", "3", "--seed", "1", "--size", "32", "--out", str(cats)]) == 0
    args = [name, "--classes", "3", "--instances", "2", "--size", "32", "--seed", "1", "--shard-size", "3",
            "--no-progress"]
    assert synth.main([*args, "--out", str(tmp_path / "a"), "--categories", str(cats)]) == 0
    assert synth.main([*args, "--out", str(tmp_path / "b")]) == 0  # searches itself
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b")
    assert json.loads((tmp_path / "a" / sh.CATEGORIES_FILE).read_text())["categories"] == \
        json.loads(cats.read_text())["categories"]
    calls = []
    real = synth.create_generator

    def spy(*a, **kw):
        calls.append(kw)
        return real(*a, **kw)

    monkeypatch.setattr(synth, "create_generator", spy)
    (tmp_path / "b" / "shard-000001.tar").unlink()
    assert synth.main([*args, "--out", str(tmp_path / "b")]) == 0
    assert calls and all("categories" in kw for kw in calls)  # the rerun reused categories.json
    assert _shards(tmp_path / "a") == _shards(tmp_path / "b")


def test_preview_grid_and_list(tmp_path, capsys):
    out = tmp_path / "grid.png"
    assert synth.main(["preview", "gratings", "--out", str(out), "--classes", "3", "--instances", "4",
                       "--size", "24"]) == 0
    grid = np.asarray(Image.open(out))
    assert grid.shape == (3 * 24, 4 * 24, 3)
    gen = create_generator("gratings", 3, 24, 0)
    assert np.array_equal(grid[24:48, 72:96], gen.render(1, 3))  # row = class, column = instance
    assert synth.main(["list"]) == 0
    assert "gratings" in capsys.readouterr().out.split()


def test_jpeg_dataset_reads_back_through_the_shard_loader(tmp_path):
    from vitscale.data.synthetic_loader import build_shard_loader

    assert synth.main([*ARGS, "--out", str(tmp_path), "--format", "jpg"]) == 0
    assert json.loads((tmp_path / sh.DATASET_FILE).read_text())["format"] == "jpg"
    x, y = next(iter(build_shard_loader(tmp_path, 32, seed=0, micro_batch=4, global_batch=4, data_rank=0,
                                        data_world=1, num_workers=0, augment=False)))
    assert x.shape == (4, 3, 32, 32) and ((y >= 0) & (y < 6)).all()


SLOW = _gratings_script("slow_gratings", "gratings at 20 images/s: the ranks' writing overlaps in time",
                        "time.sleep(0.05)")


def _bar_counts(stderr: str) -> list[tuple[int, int]]:
    """(done, total) of every state of the bar tqdm drew (carriage returns between them)."""
    import re

    return [(int(m.group(1)), int(m.group(2))) for part in re.split(r"[\r\n]", stderr)
            if "img" in part and (m := re.search(r"\| *(\d+)/(\d+) \[", part))]


def test_rank_0_bar_counts_every_ranks_images_and_stdout_stays_empty(reference, tmp_path):
    # Rank 0 starts first and lists the folder; rank 1 starts once rank 0 has said its total, so
    # rank 0's bar must count rank 1's 14 images as they appear, ending at all 30.
    script = tmp_path / "slow.py"
    script.write_text(SLOW)
    out = tmp_path / "out"
    cmd = [sys.executable, str(script), "slow_gratings", *ARGS[1:-1], "--out", str(out), "--progress"]
    env = {k: v for k, v in os.environ.items() if k not in LAUNCHER_VARS}
    stdout = tmp_path / "rank0.out"
    with open(stdout, "w") as f:
        rank0 = subprocess.Popen(cmd, env={**env, "RANK": "0", "WORLD_SIZE": "2"}, stdout=f, stderr=subprocess.PIPE,
                                 text=True)
    head = []
    while not head or "all ranks" not in head[-1]:
        line = rank0.stderr.readline()
        assert line, "".join(head)
        head.append(line)
    assert "all ranks: 5 shards, 30 images to write" in head[-1]
    rank1 = subprocess.run(cmd, env={**env, "RANK": "1", "WORLD_SIZE": "2"}, capture_output=True, text=True,
                           timeout=120)
    stderr0 = "".join(head) + rank0.stderr.read()  # to its end: rank 0 exits
    rank0.wait(timeout=120)
    stdout0 = stdout.read_text()
    assert rank0.returncode == 0 and rank1.returncode == 0, stderr0 + rank1.stderr
    assert stdout0 == "" and rank1.stdout == ""  # bars and logs on stderr only
    counts = _bar_counts(stderr0)
    assert counts and {total for _, total in counts} == {30}, counts  # the total counts both ranks' shards
    assert counts[-1] == (30, 30), counts
    assert not _bar_counts(rank1.stderr)  # only rank 0 draws
    assert "dataset complete" in stderr0 + rank1.stderr
    assert _shards(out) == _shards(reference)


def test_rank_0_stops_waiting_for_shards_that_do_not_come(tmp_path):
    spec = sh.DatasetSpec("gratings", 6, 5, 2, 32, "png", 7, {}, None)
    tracker = synth.AllRanksProgress(spec, tmp_path, [0, 2, 4])
    assert (tracker.pending, tracker.total) == ([0, 1, 2, 3, 4], 30)
    (tmp_path / spec.shard_name(3)).write_bytes(b"")  # rank 1 finished one shard, then died
    tracker.wait_for_others(stall_s=0.5)
    assert tracker.counted == {3}
