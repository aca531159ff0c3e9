"""The benchmark scripts cannot rot: each imports as ``benchmarks.<name>``, parses its options, and the evaluation
overhead benchmark runs end to end on a few images."""

from __future__ import annotations

import importlib
import json
import pkgutil
import re
from pathlib import Path

import pytest

import benchmarks

REPO = Path(__file__).resolve().parents[1]
# Shared modules, not scripts: they have no command line.
LIBRARIES = {"harness", "synthetic"}
SCRIPTS = sorted(info.name for info in pkgutil.iter_modules(benchmarks.__path__) if info.name not in LIBRARIES)


def test_every_benchmark_script_is_found() -> None:
    assert {"train_step", "adversarial_step", "show_and_fool", "cli_startup", "eval_overhead"} <= set(SCRIPTS)


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_imports_and_parses_its_options(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(f"benchmarks.{name}")
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage: " in capsys.readouterr().out


@pytest.mark.parametrize("name", SCRIPTS)
def test_script_does_not_edit_the_import_path(name: str) -> None:
    source = (REPO / "benchmarks" / f"{name}.py").read_text(encoding="utf-8")
    assert "sys.path" not in source


@pytest.mark.parametrize("name", SCRIPTS)
def test_bench_gpu_runs_every_script(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    recipe = re.search(r"^bench-gpu:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
    assert recipe is not None, "the Makefile has no bench-gpu target"
    lines = [line for line in recipe.group(1).splitlines() if f"-m benchmarks.{name} " in f"{line} "]
    assert len(lines) == 1, f"bench-gpu runs benchmarks.{name} {len(lines)} times"
    with pytest.raises(SystemExit):
        importlib.import_module(f"benchmarks.{name}").main(["--help"])
    # A script with a --device option gets --device cuda; the others (command start-up) run as they are.
    assert ("--device cuda" in lines[0]) == ("--device" in capsys.readouterr().out)


def test_eval_overhead_tiny_run(tmp_path: Path) -> None:
    from benchmarks import eval_overhead

    out = tmp_path / "eval_overhead.json"
    argv = ["--n-train", "8", "--n-val", "6", "--batch-size", "4", "--warmup", "0", "--repeats", "2"]
    report = eval_overhead.main([*argv, "--threads", "1", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == report
    assert report["command"].startswith(".venv/bin/python -m benchmarks.eval_overhead --n-train 8")
    config = report["config"]
    assert (config["train_images"], config["val_images"], config["timed_epochs"]) == (8, 6, 2)
    # BadNets at rate 0.3 of the 6 validation images.
    assert config["trigger"] == "badnets" and 1 <= config["poisoned_val_images"] < 6
    assert len(config["epochs"]) == 2
    for epoch in config["epochs"]:
        # 8 images x 5 captions = 40 training pairs in batches of 4; 6 validation images in batches of 4.
        assert (epoch["train_batches"], epoch["val_batches"]) == (10, 2)
        assert epoch["train_s"] > 0
        # The callbacks' hooks were timed (the wrappers ran) and lie inside the evaluation.
        assert 0 < epoch["robust_s"] and 0 < epoch["backdoor_s"]
        assert 0 < epoch["clean_s"] == pytest.approx(epoch["eval_s"] - epoch["robust_s"] - epoch["backdoor_s"])
    rows = {row["part"]: row for row in report["results"]}
    assert set(rows) == {"clean", "robust", "backdoor", "total"}
    total = rows["total"]
    parts = sum(rows[p]["seconds"] for p in ("clean", "robust", "backdoor"))
    assert total["seconds"] == pytest.approx(parts, rel=0.5)
    for row in rows.values():
        low, high = row["share_range"]
        assert 0 < low <= row["share"] <= high
        # Against the 6000-image default epoch, 750 times longer than this 8-image one.
        assert row["share_at_default_epoch"] == pytest.approx(row["share"] * 8 / 6000)
    assert total["goal_met"] is (total["share_at_default_epoch"] <= 0.15)
    assert rows["clean"]["goal_met"] is None


def test_dag_tiny_run_takes_a_fixed_number_of_steps(tmp_path: Path) -> None:
    from benchmarks import dag
    from modules.attacks.dag import DAG

    out = tmp_path / "dag.json"
    argv = ["--iterations", "1", "--batch-large", "2", "--repeats", "1", "--image-size", "64"]
    report = dag.main([*argv, "--threads", "1", "--device", "cpu", "--out", str(out)])
    assert json.loads(out.read_text(encoding="utf-8")) == report
    assert report["command"].startswith(".venv/bin/python -m benchmarks.dag --iterations 1")
    rows = {row["victim"]: row for row in report["results"]}
    assert set(rows) == {"detector", "segmenter"}
    for row in rows.values():
        assert row["targets_per_image"] > 0 and len(row["speedup_runs"]) == 1
        assert row["seconds_per_image_batch1"] > 0 and row["seconds_per_image_batch2"] > 0
    # Every image takes exactly the given number of steps, whatever its targets do.
    images, boxes, labels, masks = dag.synthetic_scenes(2, 64, seed=0)
    model = dag.build_victim("segmenter", None, 64).eval()
    objective = dag.objective_factory("segmenter", model, boxes, labels, masks)(images, slice(0, 2))
    result = DAG(gamma=0.5, max_iterations=3)(dag.FixedIterations(objective), images)
    assert result.iterations.tolist() == [3, 3]
    assert all(bool(active.all()) for active in objective.active)  # every target stays in the timed work
