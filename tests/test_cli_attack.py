"""`robucap attack show-and-fool|fgsm|fgsm_rs|pgd|fg|ensemble` end to end on tiny checkpoints, and its errors."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from helpers.fake_datasets import FakeDataset, write_flickr8k, write_karpathy
from transformers.utils import logging as hf_logging

from callbacks.image_grid import difference_gain, difference_image
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from datamodules.shapes import COLORS
from lightning_app.attack.data import saved_data_settings
from lightning_app.cli import main
from modules.attacks.show_and_fool import ShowAndFool
from modules.captioning import CaptioningModule
from modules.evaluation import evaluation_loader
from modules.transfer import rmsd_255

TARGET = "a small red cross to the left of a small red cross"  # words of the shapes vocabulary


def _common(ckpt: Path, root: Path, out: Path) -> list[str]:
    return ["--ckpt", str(ckpt), "--data-root", str(root), "--images", "4", "--batch-size", "3", "--out", str(out)]


def _missing_colour(checkpoint: Path, root: Path, n_images: int) -> str:
    """A colour word absent from some clean caption of the first test images, so the keyword attack has work: which
    colours the tiny model names depends on its training run, not on this test."""
    module = CaptioningModule.load_from_checkpoint(checkpoint, map_location="cpu", weights_only=True).eval()
    dm = CaptionDataModule(format="coco", root=str(root), image_size=32, progress=False)
    dm.tokenizer = module.tokenizer
    batch = next(iter(evaluation_loader(module, dm.eval_dataset("test"), n_images, n_images)))
    captions = [set(c.split()) for c in module.caption(batch["pixel_values"])]
    return next(c for c in COLORS if any(c not in words for words in captions))


def test_show_and_fool_caption_and_keyword(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "sf"
    keyword = _missing_colour(trained_checkpoint, shapes_root, n_images=4)
    args = ["attack", "show-and-fool", *_common(trained_checkpoint, shapes_root, out), "--iterations", "20",
            "--rounds", "1", "--target", TARGET, "--keywords", keyword, "--no-meteor", "--examples", "2"]  # fmt: skip
    assert main(args) == 0
    assert f"report: {out / 'report.html'}" in capsys.readouterr().out
    results = json.loads((out / "results.json").read_text())
    assert results["modes"] == ["caption", "keyword_1"]  # --target and --keywords pick the modes
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
    assert blocks["keyword_1"]["records"][0]["target"] == [keyword]
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
    attack = ShowAndFool(iterations=3, search_rounds=1)
    run = targeted_eval.run_show_and_fool(module, images, ids, refs, attack, n_keywords=1, seed=1, meteor=False)
    assert run.adversarial.shape == images.shape and run.skipped == []
    for record, own in zip(run.records, clean, strict=True):
        (keyword,) = record.target
        assert keyword not in own.split() and keyword in record.target_caption.split()
        assert record.target_caption in clean and record.target_caption != own
    caption_run = targeted_eval.run_show_and_fool(module, images, ids, refs, attack, seed=1, meteor=False)
    assert all(r.target in clean and r.target != r.clean for r in caption_run.records)
    with pytest.raises(RobucapError, match="the fixed target of keyword_1 must be 1 keywords"):
        targeted_eval.run_show_and_fool(module, images, ids, refs, attack, n_keywords=1, target="a red cross")


@pytest.mark.parametrize("method", ["fgsm", "pgd"])
def test_gradient_attacks(
    method: str, distinct_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a model that tells the test images apart, each record must be its own image's: its clean caption, its
    references, its distortion within the budget; and the attack must change captions."""
    out = tmp_path / method
    if method == "pgd":  # through a data config file's data: section
        config = tmp_path / "data.yaml"
        config.write_text(f"data:\n  format: coco\n  root: {shapes_root}\n  image_size: 32\n  progress: false\n")
        args = ["--ckpt", str(distinct_checkpoint), "--data_config", str(config), "--images", "6", "--steps", "3"]
        args += ["--batch-size", "4", "--out", str(out)]
    else:
        args = _common(distinct_checkpoint, shapes_root, out) + ["--images", "6"]
    assert main(["attack", method, *args, "--epsilon", "0.05"]) == 0
    assert f"robucap attack {method} done" in capsys.readouterr().out
    block = json.loads((out / "results.json").read_text())["attack"]
    assert {"name", "epsilon", "bleu4_clean", "bleu4_adv", "changed", "rmsd"} <= set(block)
    assert block["name"] == method and block["epsilon"] == 0.05 and block["n"] == 6
    module = CaptioningModule.load_from_checkpoint(distinct_checkpoint, map_location="cpu", weights_only=True).eval()
    dm = CaptionDataModule(format="coco", root=str(shapes_root), image_size=32, progress=False)
    dm.tokenizer = module.tokenizer
    batch = next(iter(evaluation_loader(module, dm.eval_dataset("test"), 6, 6)))
    records = block["records"]
    clean = module.caption(batch["pixel_values"])
    assert len(set(clean)) > 2  # the model tells images apart, so a mix-up below would show
    assert [r["clean"] for r in records] == clean
    assert [r["image_id"] for r in records] == list(batch["image_id"])
    assert [r["references"] for r in records] == [list(refs) for refs in batch["references"]]
    assert all(0.0 < r["linf"] <= 0.05 + 1e-6 and 0.0 < r["rmsd"] <= 0.05 * 255 + 1e-3 for r in records)
    assert block["changed"] == pytest.approx(sum(r["changed"] for r in records) / 6)
    assert block["changed"] > 0  # an attack at 0.05 changes some caption of this barely trained model
    assert all(r["changed"] == (r["clean"] != r["prediction"]) for r in records)
    assert block["rmsd"] == pytest.approx(sum(r["rmsd"] for r in records) / 6)
    assert "data:image/png;base64," in (out / "report.html").read_text()


def test_ensemble_held_out(
    trained_checkpoint: Path,
    distinct_checkpoint: Path,
    shapes_root: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The held-out model is another training run (12 epochs, not 4), so it captions the clean images otherwise
    than the member does: the table's rows must be each model's own evaluation of the same adversarial images."""
    second = distinct_checkpoint
    out = tmp_path / "ensemble"
    args = ["attack", "ensemble", "--ckpt", str(trained_checkpoint), str(second), "--held-out", "1",
            "--data-root", str(shapes_root), "--images", "3", "--iterations", "2", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())
    block = results["ensemble"]
    assert (block["members"], block["held_out"], block["method"], block["targeted"]) == ([0], 1, "optimization", False)
    assert [m["role"] for m in block["models"]] == ["member", "held_out"]
    assert block["held_out_result"]["checkpoint"] == str(second)
    assert {"bleu4_clean", "bleu4_adv", "changed"} <= set(block["held_out_result"]) and block["rmsd"] >= 0.0
    # The records are the held-out model's (the reference): its clean captions, which the member's differ from.
    held_out = CaptioningModule.load_from_checkpoint(second, map_location="cpu", weights_only=True).eval()
    member = CaptioningModule.load_from_checkpoint(trained_checkpoint, map_location="cpu", weights_only=True).eval()
    images = _test_images(held_out, shapes_root, 3)
    assert [r["clean"] for r in block["records"]] == held_out.caption(images)
    assert held_out.caption(images) != member.caption(images)
    assert block["models"][0]["bleu4_clean"] != block["models"][1]["bleu4_clean"]
    out2 = tmp_path / "targeted"
    args = ["attack", "ensemble", "--ckpt", str(trained_checkpoint), str(second), "--targeted", "--target", TARGET,
            "--method", "fgs", "--epsilon", "0.03", "--data-root", str(shapes_root), "--images", "2",
            "--out", str(out2)]  # fmt: skip
    assert main(args) == 0
    block = json.loads((out2 / "results.json").read_text())["ensemble"]
    assert all(0.0 <= m["target_rate"] <= 1.0 for m in block["models"]) and block["held_out"] is None
    assert all(r["target"] == TARGET and r["success"] == (r["prediction"] == TARGET) for r in block["records"])
    assert "robucap attack ensemble done" in capsys.readouterr().out


def _test_images(module: CaptioningModule, root: Path, n_images: int) -> torch.Tensor:
    """The first ``n_images`` test images of the shapes dataset at ``root``, as the attack command loads them."""
    dm = CaptionDataModule(format="coco", root=str(root), image_size=32, progress=False)
    dm.tokenizer = module.tokenizer
    return next(iter(evaluation_loader(module, dm.eval_dataset("test"), n_images, n_images)))["pixel_values"]


def test_helpers() -> None:
    clean = torch.zeros(2, 3, 4, 4)
    adversarial = clean.clone()
    adversarial[0] += 1 / 255
    assert rmsd_255(clean, adversarial).tolist() == pytest.approx([1.0, 0.0])
    delta = difference_image(clean, adversarial, gain=10.0)
    assert torch.allclose(delta[1], torch.full_like(delta[1], 0.5))
    assert torch.allclose(delta[0], torch.full_like(delta[0], 0.5 + 10 / 255))
    # One rule: an L-infinity budget maps to the full range; without one, the figure's largest change does.
    assert difference_gain(adversarial - clean, epsilon=0.05) == pytest.approx(10.0)
    assert difference_gain(adversarial - clean) == pytest.approx(0.5 * 255)
    assert difference_gain([torch.zeros(3), torch.tensor([0.0, -0.25, 0.1])]) == pytest.approx(2.0)
    assert difference_gain([torch.zeros(3)]) == pytest.approx(0.5 * 255)  # no change: no division by zero


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
        (["--lr_growth", "0.5"], "Show-and-Fool lr_growth must be a number >= 1, got 0.5"),
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
    anonymous = tmp_path / "anonymous.ckpt"  # as written before data settings were saved, or by other tools
    state = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    del state["datamodule_hyper_parameters"]
    torch.save(state, anonymous)
    assert _error(["attack", "fgsm", "--ckpt", str(anonymous), *out], capsys).startswith(
        "no data: give --data_root (a dataset directory) or --data_config"
    )
    assert _error(["attack", "ensemble", *ckpt, *data, *out], capsys) == (
        "the ensemble attack needs at least 2 checkpoints (--ckpt A B ...), got 1"
    )
    assert not (tmp_path / "o").exists()


def test_unreadable_checkpoints(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(trained_checkpoint.read_bytes()[:4096])
    foreign = tmp_path / "foreign.ckpt"  # a valid torch file that no robucap run wrote
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    argv = ["--data-root", str(shapes_root), "--out", str(tmp_path / "o")]
    assert _error(["attack", "fgsm", "--ckpt", str(truncated), *argv], capsys).startswith(
        f"cannot read checkpoint {truncated}: it is not a PyTorch checkpoint archive"
    )
    assert _error(["attack", "show-and-fool", "--ckpt", str(foreign), *argv], capsys) == (
        f"checkpoint {foreign} was not written by robucap's CaptioningModule (no tokenizer inside)"
    )
    assert not (tmp_path / "o").exists()


def test_a_bug_while_loading_a_checkpoint_is_not_bad_input(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def broken(*args: object, **kwargs: object) -> None:
        raise AttributeError("a bug in the model's construction")

    monkeypatch.setattr(CaptioningModule, "load_from_checkpoint", broken)
    with pytest.raises(AttributeError, match="a bug in the model's construction"):
        main(["attack", "fgsm", *_common(trained_checkpoint, shapes_root, tmp_path / "o")])


# -- data settings: from the checkpoint, detected for another root -------------------------
# 8 test images: enough for the tiny model's adversarial captions to differ in length within a batch, the case in
# which transformers warned about a missing attention mask.
DATASETS: dict[str, Callable[[Path], FakeDataset]] = {
    "flickr8k": lambda root: write_flickr8k(root, 8),  # native text files in Flickr8k_text/
    "karpathy": lambda root: write_karpathy(root, "flickr8k", 8),
}


@contextmanager
def _transformers_warnings() -> Iterator[list[str]]:
    """Messages transformers logs at WARNING or above inside the block, its once-per-process warnings re-armed.

    transformers prints through its own handler on the stderr of import time, out of capsys' reach, so a handler of
    ours on its root logger sees what a user would.
    """
    messages: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            messages.append(record.getMessage())

    hf_logging.warning_once.cache_clear()
    handler = Keep(logging.WARNING)
    logger = logging.getLogger("transformers")
    logger.addHandler(handler)
    try:
        yield messages
    finally:
        logger.removeHandler(handler)


@pytest.mark.parametrize("layout", sorted(DATASETS))
def test_attack_real_layout_without_config(
    layout: str, trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bare --data-root of another layout than the checkpoint's is detected and read at the
    checkpoint's 32 px, though its images are other sizes and its words unknown to the tokenizer; finding 15: the
    attack prints no transformers warning (attention_mask advice) on stderr."""
    root = tmp_path / layout
    fake = DATASETS[layout](root)
    assert all(size != (32, 32) for size in fake.sizes.values())
    out = tmp_path / "out"
    argv = ["attack", "fgsm", "--ckpt", str(trained_checkpoint), "--data-root", str(root), "--images", "8",
            "--batch-size", "8", "--examples", "1", "--out", str(out)]  # fmt: skip
    with _transformers_warnings() as warned:
        assert main(argv) == 0
    captured = capsys.readouterr()
    assert "robucap attack fgsm done" in captured.out
    assert warned == [] and "attention_mask" not in captured.err
    results = json.loads((out / "results.json").read_text())
    assert results["data"] == {
        "format": layout, "format_from": "detected", "root": str(root), "config": None, "split": "test",
        "image_size": 32, "n_images": 8,
    }  # fmt: skip
    records = results["attack"]["records"]
    assert {r["image_id"]: r["references"] for r in records} == fake.splits["test"]


def test_generation_passes_a_decoder_attention_mask(trained_checkpoint: Path) -> None:
    """GPT-2 gets an attention mask at every generation step, so transformers has no padding
    to warn about (its warning is once per process, so this checks the cause rather than the message)."""
    module = CaptioningModule.load_from_checkpoint(trained_checkpoint, map_location="cpu", weights_only=True).eval()
    masks: list[torch.Tensor | None] = []

    def spy(_: torch.nn.Module, args: tuple[object, ...], kwargs: dict[str, object]) -> None:
        mask = kwargs.get("attention_mask")
        masks.append(mask if isinstance(mask, torch.Tensor) else None)

    handle = module.captioner.model.decoder.register_forward_pre_hook(spy, with_kwargs=True)
    try:
        images = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
        greedy = module.captioner.generate(images, max_new_tokens=6)
        beams = module.captioner.generate(images, max_new_tokens=6, num_beams=2)
    finally:
        handle.remove()
    assert greedy.shape[0] == beams.shape[0] == 3 and len(masks) >= 2
    assert all(mask is not None and bool(mask.eq(1).all()) for mask in masks)


def test_attack_uses_the_checkpoint_data_settings(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Without --config and --data-root the checkpoint's own format and root are used; a
    config's data.image_size (224 in configs/data/flickr8k.yaml) no longer refuses a 32 px checkpoint."""
    assert saved_data_settings(trained_checkpoint) == {"format": "coco", "root": str(shapes_root), "max_tokens": 32}
    out = tmp_path / "own"
    argv = ["attack", "fgsm", "--ckpt", str(trained_checkpoint), "--images", "2", "--examples", "0", "--out", str(out)]
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())["data"]
    assert (data["format"], data["format_from"], data["root"], data["image_size"]) == (
        "coco", "checkpoint", str(shapes_root), 32
    )  # fmt: skip

    flickr = tmp_path / "flickr8k"
    write_flickr8k(flickr, 2)
    config = tmp_path / "flickr8k.yaml"
    config.write_text(f"data:\n  format: flickr8k\n  root: {flickr}\n  image_size: 224\n  min_freq: 5\n")
    out = tmp_path / "config"
    argv = ["attack", "fgsm", "--ckpt", str(trained_checkpoint), "--data_config", str(config), "--images", "2",
            "--examples", "0", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((out / "results.json").read_text())["data"]
    assert (data["format"], data["format_from"], data["image_size"], data["n_images"]) == ("flickr8k", "config", 32, 2)
    capsys.readouterr()


def test_explicit_format_wins_over_detection(
    trained_checkpoint: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A root holding two layouts is one error naming both, and --format picks one."""
    root = tmp_path / "both"
    write_flickr8k(root, 2)
    write_karpathy(root, "flickr8k", 2)
    base = ["attack", "fgsm", "--ckpt", str(trained_checkpoint), "--data-root", str(root), "--images", "2",
            "--examples", "0"]  # fmt: skip
    message = _error([*base, "--out", str(tmp_path / "o")], capsys)
    assert message.startswith(f"{root} holds the files of several dataset formats (flickr8k: ")
    assert "karpathy: dataset_flickr8k.json" in message and message.endswith("; give --format or --data_config")
    out = tmp_path / "karpathy"
    assert main([*base, "--format", "karpathy", "--out", str(out)]) == 0
    data = json.loads((out / "results.json").read_text())["data"]
    assert (data["format"], data["format_from"]) == ("karpathy", "--format")


def test_data_setting_errors(
    trained_checkpoint: Path, shapes_root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A wrong --image-size, an unknown layout and a moved dataset are one line each."""
    ckpt = ["attack", "fgsm", "--ckpt", str(trained_checkpoint)]
    out = ["--out", str(tmp_path / "o")]
    assert _error([*ckpt, "--data-root", str(shapes_root), "--image-size", "64", *out], capsys) == (
        f"--image_size is 64 px but checkpoint {trained_checkpoint}'s captioner takes 32 px images "
        "(leave --image_size out to use the checkpoint's size)"
    )
    empty = tmp_path / "empty"
    empty.mkdir()
    message = _error([*ckpt, "--data-root", str(empty), *out], capsys)
    assert message.startswith(f"cannot tell the dataset format of {empty}: it has none of the files looked for (")
    assert "flickr8k: Flickr8k.token.txt" in message and message.endswith("; give --format or --data_config")

    moved = tmp_path / "moved.ckpt"
    state = torch.load(trained_checkpoint, map_location="cpu", weights_only=True)
    state["datamodule_hyper_parameters"]["root"] = str(tmp_path / "gone")
    torch.save(state, moved)
    assert _error(["attack", "fgsm", "--ckpt", str(moved), *out], capsys) == (
        f"data directory {tmp_path / 'gone'}, recorded in checkpoint {moved}, does not exist; give --data_root "
        "(where the dataset is now) or --data_config"
    )
    assert not (tmp_path / "o").exists()


def test_top_level_help_names_every_study_and_points_to_the_attacks(capsys: pytest.CaptureFixture[str]) -> None:
    """``robucap --help`` is hand-written (it must not import torch): it names every study, and sends the reader to
    ``robucap attack --help``, which lists every attack subcommand (attacks register themselves)."""
    from lightning_app.attack import subcommands
    from lightning_app.studies import available_studies

    assert main(["--help"]) == 0
    text = capsys.readouterr().out
    assert all(f"study {name} --out DIR" in text for name in available_studies())
    attack_line = next(line for line in text.splitlines() if line.strip().startswith("attack "))
    assert "--data_root" in attack_line and "--data-root" not in text and "robucap attack --help" in text
    assert main(["attack", "--help"]) == 0
    usage = capsys.readouterr().out
    assert all(name in usage for name in subcommands())
