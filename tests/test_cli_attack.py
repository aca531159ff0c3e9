"""`robucap attack show-and-fool|fgsm|pgd|ensemble` end to end on the tiny trained checkpoint, and its errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from lightning_app.attack import amplified_delta
from lightning_app.cli import main
from modules.attacks.show_and_fool import ShowAndFool
from modules.captioning import CaptioningModule
from modules.evaluation import evaluation_loader
from modules.transfer import rmsd_255

TARGET = "a small red cross to the left of a small red cross"  # words of the shapes vocabulary


def _common(ckpt: Path, root: Path, out: Path) -> list[str]:
    return ["--ckpt", str(ckpt), "--data-root", str(root), "--images", "4", "--batch-size", "3", "--out", str(out)]


def test_show_and_fool_caption_and_keyword(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sf"
    args = ["attack", "show-and-fool", *_common(trained_checkpoint, shapes_root, out), "--iterations", "20",
            "--rounds", "1", "--target", TARGET, "--keywords", "red", "--no-meteor", "--examples", "2"]  # fmt: skip
    assert main(args) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["settings"]["modes"] == ["caption", "keyword_1"]  # --target and --keywords pick the modes
    assert results["data"]["format"] == "shapes" and results["data"]["n_images"] == 4
    blocks = results["show_and_fool"]
    assert set(blocks) == {"caption", "keyword_1"}
    for block in blocks.values():
        assert {"success_rate", "mean_l2", "n", "n_success", "failures", "records", "skipped"} <= set(block)
        assert block["n"] + len(block["skipped"]) == 4 and len(block["records"]) == block["n"]
        assert block["success_rate"] == block["n_success"] / block["n"]
        assert block["failures"]["meteor"] is None  # --no-meteor
        record = block["records"][0]
        assert {"image_id", "clean", "target", "prediction", "success", "l2", "c", "iterations"} <= set(record)
    assert blocks["caption"]["records"][0]["target"] == TARGET
    assert blocks["keyword_1"]["records"][0]["target"] == ["red"]
    assert sum(blocks["keyword_1"]["keywords_found_histogram"].values()) == blocks["keyword_1"]["failures"]["n"]
    html = (out / "report.html").read_text()
    assert "Table 1" in html and "Table 3" in html and html.count("data:image/png;base64,") == 2


def test_paper_style_targets(trained_checkpoint: Path, shapes_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Targets come from other images' clean captions; keyword records know the caption they came from."""
    import modules.targeted_eval as targeted_eval

    module = CaptioningModule.load_from_checkpoint(trained_checkpoint, map_location="cpu", weights_only=True).eval()
    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, progress=False)
    dm.tokenizer = module.tokenizer
    batch = next(iter(evaluation_loader(module, dm.eval_dataset("test"), 3, 3)))
    # The tiny model captions every test image alike: give it distinct clean captions so targets exist.
    clean = ["a small red cross", "a large blue circle", "a small green square"]
    monkeypatch.setattr(targeted_eval, "greedy_captions", lambda *args, **kwargs: list(clean))
    images, ids, refs = batch["pixel_values"], batch["image_id"], batch["references"]
    attack = ShowAndFool(mode="keyword", iterations=3, search_rounds=1)
    run = targeted_eval.run_show_and_fool(module, images, ids, refs, attack, n_keywords=1, seed=1, meteor=False)
    assert run["adversarial"].shape == images.shape and run["skipped"] == []
    for record, own in zip(run["records"], clean, strict=True):
        (keyword,) = record["target"]
        assert keyword not in own.split() and keyword in record["target_caption"].split()
        assert record["target_caption"] in clean and record["target_caption"] != own
    caption_run = targeted_eval.run_show_and_fool(
        module, images, ids, refs, ShowAndFool(iterations=3, search_rounds=1), seed=1, meteor=False
    )
    assert all(r["target"] in clean and r["target"] != r["clean"] for r in caption_run["records"])
    with pytest.raises(RobucapError, match="mode 'keyword' does not match n_keywords=0"):
        targeted_eval.run_show_and_fool(module, images, ids, refs, attack, n_keywords=0)


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_gradient_attacks(
    method: str, trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / method
    if method == "pgd":  # through a config file's data: section
        config = tmp_path / "data.yaml"
        config.write_text(f"data:\n  format: coco\n  root: {shapes_root}\n  image_size: 32\n  progress: false\n")
        args = ["--ckpt", str(trained_checkpoint), "--config", str(config), "--images", "4", "--steps", "2"]
        args += ["--out", str(out)]
    else:
        args = _common(trained_checkpoint, shapes_root, out)
    assert main(["attack", method, *args, "--epsilon", "0.05"]) == 0
    assert f"robucap attack {method} done" in capsys.readouterr().out
    block = json.loads((out / "results.json").read_text())["attack"]
    assert {"name", "epsilon", "bleu4_clean", "bleu4_adv", "changed", "rmsd"} <= set(block)
    assert block["name"] == method and block["epsilon"] == 0.05 and block["n"] == 4
    assert 0.0 <= block["changed"] <= 1.0 and 0.0 < block["rmsd"] <= 0.05 * 255 + 1e-3
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_ensemble_held_out(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("modules.attacks.ensemble")
    second = tmp_path / "second.ckpt"
    shutil.copy(trained_checkpoint, second)
    out = tmp_path / "ensemble"
    args = ["attack", "ensemble", "--ckpt", str(trained_checkpoint), str(second), "--held-out", "1",
            "--data-root", str(shapes_root), "--images", "3", "--iterations", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    block = json.loads((out / "results.json").read_text())["ensemble"]
    assert (block["members"], block["held_out"], block["method"], block["targeted"]) == ([0], 1, "optimization", False)
    assert [m["role"] for m in block["models"]] == ["member", "held_out"]
    assert block["held_out_result"]["checkpoint"] == str(second)
    assert {"bleu4_clean", "bleu4_adv", "changed"} <= set(block["held_out_result"]) and block["rmsd"] >= 0.0
    out2 = tmp_path / "targeted"
    args = ["attack", "ensemble", "--ckpt", str(trained_checkpoint), str(second), "--targeted", "--target", TARGET,
            "--method", "fgs", "--epsilon", "0.03", "--data-root", str(shapes_root), "--images", "2",
            "--out", str(out2)]  # fmt: skip
    assert main(args) == 0
    block = json.loads((out2 / "results.json").read_text())["ensemble"]
    assert all(0.0 <= m["target_rate"] <= 1.0 for m in block["models"]) and block["held_out"] is None
    assert "robucap attack ensemble done" in capsys.readouterr().out


def test_helpers() -> None:
    clean = torch.zeros(2, 3, 4, 4)
    adversarial = clean.clone()
    adversarial[0] += 1 / 255
    assert rmsd_255(clean, adversarial).tolist() == pytest.approx([1.0, 0.0])
    delta = amplified_delta(clean, adversarial)
    assert torch.allclose(delta[1], torch.full_like(delta[1], 0.5))
    assert torch.allclose(delta[0], torch.full_like(delta[0], 0.5 + 10 / 255))


def _error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("robucap: error: ") and "\n" not in err
    return err.removeprefix("robucap: error: ")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (
            ["--target", "a zebra riding a unicorn"],
            "outside the captioner's vocabulary: ['zebra', 'riding', 'unicorn']",
        ),
        (["--keywords", " , "], "--keywords needs at least one keyword (comma-separated, e.g. dog,frisbee), got ' , '"),
        (["--keywords", "red,zebra"], "target keywords ['zebra'] are not words of the captioner's vocabulary"),
        (["--keywords", "red", "--modes", "keyword_2"], "--keywords gives 1 keywords ['red'] but --modes asks for"),
        (["--c", "0"], "Show-and-Fool c (initial_c) must be a number > 0, got 0.0"),
        (["--iterations", "0"], "Show-and-Fool iterations must be an integer >= 1, got 0"),
        (["--modes", "caption,keyword_x"], "unknown Show-and-Fool mode 'keyword_x'"),
        (["--images", "0"], "--images must be >= 1, got 0"),
    ],
)
def test_show_and_fool_errors(
    extra: list[str],
    message: str,
    trained_checkpoint: Path,
    shapes_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    argv = ["attack", "show-and-fool", *_common(trained_checkpoint, shapes_root, tmp_path / "o"), *extra]
    assert message in _error(argv, capsys)
    assert not (tmp_path / "o").exists()


def test_input_errors(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "no.ckpt"
    out = ["--out", str(tmp_path / "o")]
    ckpt = ["--ckpt", str(trained_checkpoint)]
    data = ["--data-root", str(shapes_root)]
    assert (
        _error(["attack", "fgsm", "--ckpt", str(missing), *data, *out], capsys)
        == f"checkpoint {missing} does not exist"
    )
    assert _error(["attack", "fgsm", *ckpt, *data, "--epsilon", "2", *out], capsys) == (
        "epsilon must be in [0, 1] (pixel units; 8/255 = 0.0314), got 2.0"
    )
    assert _error(["attack", "pgd", *ckpt, *data, "--steps", "0", *out], capsys) == (
        "PGD steps must be an integer >= 1, got 0"
    )
    assert _error(["attack", "fgsm", *ckpt, "--data-root", str(tmp_path / "nowhere"), *out], capsys).startswith(
        f"data directory {tmp_path / 'nowhere'} does not exist"
    )
    assert _error(["attack", "fgsm", *ckpt, *out], capsys).startswith("no data: give --config")
    assert _error(["attack", "ensemble", *ckpt, *data, *out], capsys) == (
        "the ensemble attack needs at least 2 checkpoints (--ckpt A B ...), got 1"
    )
    assert not (tmp_path / "o").exists()
