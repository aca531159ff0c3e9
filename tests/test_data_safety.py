"""A shapes dataset directory is written once, atomically, and never rewritten or deleted afterwards."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from subprocess import PIPE

import pytest
from helpers.fake_datasets import tree_digest

from datamodules import shapes
from datamodules.datamodule import CaptionDataModule
from datamodules.scratch import scratch_tag
from datamodules.shapes import ShapesConfig, generate_shapes, shapes_ready
from lightning_app.cli import main

REPO = Path(__file__).resolve().parents[1]
SMALL = ShapesConfig(n_train=6, n_val=2, n_test=2, image_size=32, seed=3)


def _scratch_dirs(out: Path) -> list[Path]:
    return sorted(out.parent.glob(f".{out.name}.partial.*"))


def test_fit_refuses_a_dataset_made_with_other_settings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """`robucap fit --data.root X` never rewrites a dataset `robucap data shapes` made in X."""
    root = tmp_path / "mine"
    assert main(["data", "shapes", "--out", str(root), "--n-train", "6", "--n-val", "2", "--n-test", "2",
                 "--image-size", "32", "--seed", "3"]) == 0  # fmt: skip
    capsys.readouterr()
    before = tree_digest(root)
    monkeypatch.chdir(tmp_path)  # anything LightningCLI writes by default goes here
    code = main(["fit", "--config", str(REPO / "configs/experiment/shapes_tiny.yaml"), "--data.root", str(root),
                 "--data.progress", "false", "--trainer.logger", "false", "--trainer.default_root_dir",
                 str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"])  # fmt: skip
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"robucap: error: {root} holds a shapes dataset made with n_train=6, n_val=2, n_test=2, image_size=32, "
        "seed=3; this run asks for n_train=6000, n_val=1000, n_test=1000, image_size=64, seed=0: pass "
        "--data.shapes.n_train 6 --data.shapes.n_val 2 --data.shapes.n_test 2 --data.image_size 32 "
        "--data.shapes.seed 3 to use it, or choose another --data.root; an existing dataset is never rewritten"
    ]
    assert tree_digest(root) == before

    # Following the advice uses the dataset as it is.
    dm = CaptionDataModule(
        format="shapes", root=str(root), image_size=32, progress=False,
        shapes={"n_train": 6, "n_val": 2, "n_test": 2, "seed": 3},
    )  # fmt: skip
    dm.prepare_data()
    dm.setup("fit")
    assert dm.describe()["splits"] == {"train": 6, "val": 2}
    assert tree_digest(root) == before


def test_data_shapes_never_rewrites(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`robucap data shapes` says an identical dataset is there and refuses any other."""
    out = tmp_path / "shapes"
    args = ["data", "shapes", "--out", str(out), "--n-train", "6", "--n-val", "2", "--n-test", "2",
            "--image-size", "32"]  # fmt: skip
    assert main(args) == 0
    assert "written to" in capsys.readouterr().out
    before = tree_digest(out)
    assert main(args) == 0
    assert capsys.readouterr().out.strip() == (
        f"shapes dataset already in {out} (train 6, val 2, test 2 images at 32 px): nothing written"
    )
    assert main([*args, "--captions-per-image", "4"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.endswith(
        "made with captions_per_image=5; this run asks for captions_per_image=4: pass --captions-per-image 5 "
        "to use it, or choose another --out; an existing dataset is never rewritten"
    )
    assert tree_digest(out) == before

    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "holiday.jpg").write_bytes(b"not ours")
    assert main(["data", "shapes", "--out", str(foreign), "--n-train", "2"]) == 2
    assert "it contains holiday.jpg" in capsys.readouterr().err
    assert [p.name for p in foreign.iterdir()] == ["holiday.jpg"]


_CONCURRENT_CHILD = """
import sys, time
from pathlib import Path
from datamodules.shapes import ShapesConfig, generate_shapes
go = Path(sys.argv[2])
Path(sys.argv[3]).touch()
while not go.exists():
    time.sleep(0.005)
generate_shapes(sys.argv[1], ShapesConfig(n_train=60, n_val=10, n_test=10, image_size=16, seed=1), progress=False)
"""


@pytest.mark.parametrize("empty_dir", [False, True], ids=["absent", "empty"])
def test_concurrent_first_uses_both_succeed(tmp_path: Path, empty_dir: bool) -> None:
    """Two processes generating the same fresh root at once both succeed, same data."""
    out, go = tmp_path / "shapes", tmp_path / "go"
    if empty_dir:
        out.mkdir()
    # Plain subprocesses (not multiprocessing): they import only the generator, not this test module.
    ready = [tmp_path / "ready0", tmp_path / "ready1"]
    workers = [
        subprocess.Popen([sys.executable, "-c", _CONCURRENT_CHILD, str(out), str(go), str(r)], cwd=REPO, stderr=PIPE)
        for r in ready
    ]
    deadline = time.monotonic() + 60
    while not all(r.exists() for r in ready):  # both past their imports, polling for the start signal
        assert all(w.poll() is None for w in workers) and time.monotonic() < deadline, "a worker did not start"
        time.sleep(0.01)
    go.touch()
    errors = [w.communicate(timeout=120)[1].decode() for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    config = ShapesConfig(n_train=60, n_val=10, n_test=10, image_size=16, seed=1)
    assert shapes_ready(out, config) and _scratch_dirs(out) == []
    generate_shapes(tmp_path / "alone", config, progress=False)
    assert tree_digest(out) == tree_digest(tmp_path / "alone")


def test_an_error_mid_generation_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A generation that fails half-way leaves neither a partial dataset nor scratch."""
    render = shapes._render
    calls = []

    def failing(*args: object) -> object:
        calls.append(1)
        if len(calls) == 4:
            raise KeyboardInterrupt  # e.g. Ctrl-C half-way
        return render(*args)

    monkeypatch.setattr(shapes, "_render", failing)
    out = tmp_path / "shapes"
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(out, SMALL, progress=False)
    assert not out.exists() and _scratch_dirs(out) == []
    # An empty directory the user made stays (empty) too.
    out.mkdir()
    calls.clear()
    with pytest.raises(KeyboardInterrupt):
        generate_shapes(out, SMALL, progress=False)
    assert list(out.iterdir()) == [] and _scratch_dirs(out) == []


_KILLED_CHILD = """
import sys
from datamodules.shapes import ShapesConfig, generate_shapes
generate_shapes(sys.argv[1], ShapesConfig(n_train=100000, n_val=0, n_test=0, image_size=16), progress=False)
"""


def test_a_killed_generation_leaves_no_dataset_and_its_scratch_is_removed(tmp_path: Path) -> None:
    """SIGKILL mid-generation leaves no `out`; the next generation removes the scratch."""
    out = tmp_path / "shapes"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD, str(out)], cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not any(s.joinpath("images/train/000020.png").exists() for s in _scratch_dirs(out)):
            assert child.poll() is None and time.monotonic() < deadline, "the generation did not start"
            time.sleep(0.05)
    finally:
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
    assert not out.exists()
    (leftover,) = _scratch_dirs(out)
    # Scratch of a live process (a concurrent first use) must stay.
    live = tmp_path / f".shapes.partial.{scratch_tag()}.0123abcd"
    live.mkdir()
    generate_shapes(out, SMALL, progress=False)
    assert shapes_ready(out, SMALL)
    assert not leftover.exists() and live.is_dir()


def test_studies_default_to_a_root_of_their_own_shapes_settings() -> None:
    """``robucap study ... --profile smoke`` (48 training images) or the freeze study with
    ``--seed 1`` used ``data/shapes`` by default, which regenerated (deleted) the demo's dataset; they now default to
    a folder named after the settings that differ, so neither deletes nor hits the refusal."""
    from lightning_app.studies import load_study
    from lightning_app.studies.base import StudyData

    def root(name: str, smoke: bool = False, seed: int | None = None, image_size: int = 64) -> str:
        study = load_study(name)
        settings = study.settings_type() if seed is None else study.settings_type(seed=seed)
        data = StudyData(image_size=image_size, shapes={"n_train": 48} if smoke else {})
        return data.module_options(study.data_seed(settings))["root"]

    assert root("freeze") == root("backdoor", seed=2021) == root("transfer") == "data/shapes"
    assert root("backdoor", smoke=True) == "data/shapes_smoke"
    assert root("freeze", seed=1) == "data/shapes_seed1"
    assert root("freeze", smoke=True, seed=2, image_size=32) == "data/shapes_smoke_seed2_32px"
