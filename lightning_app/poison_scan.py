"""``robucap poison-scan``: rank the training images of a (possibly poisoned) dataset by a poisoning score.

The score is the spectral signature of a trained model's encoder features (:mod:`modules.defenses.spectral`). With
a poisoned dataset the ground truth is known (``poisoned`` on every record), so the scan reports how well the
ranking finds the poisoned images: precision and recall when flagging the top ``remove_share`` of the images
(Tran et al. remove 1.5 times the expected poisoning rate), precision at k = the true number of poisoned images
(where precision equals recall) and ROC AUC.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from callbacks.image_grid import figure_png, pyplot
from datamodules.datamodule import CaptionDataModule
from datamodules.errors import RobucapError
from lightning_app.inputs import checkpoint_path, data_options
from lightning_app.report import Report
from modules.captioning import CaptioningModule
from modules.defenses import encoder_features, ranking_quality, spectral_signature_scores
from modules.evaluation import evaluation_loader


@dataclass(frozen=True)
class ScanResult:
    """The outcome of a scan.

    Attributes:
        block: The ``poison_scan`` block of ``results.json`` (plain JSON).
        scores: Each training image's poisoning score. Shape: ``(N,)``.
        is_poisoned: Each training image's ground truth. Shape: ``(N,)``.
    """

    block: dict[str, Any]
    scores: torch.Tensor
    is_poisoned: torch.Tensor


def scan(module: CaptioningModule, datamodule: CaptionDataModule, remove_share: float = 0.45) -> ScanResult:
    """Score every training image and measure the ranking against the poisoning ground truth.

    Args:
        module: A trained captioner (typically trained on the data being scanned).
        datamodule: The training data; ``poisoned`` flags give the ground truth.
        remove_share: Share of the training images flagged (the top scores).

    Returns:
        The ``poison_scan`` block of ``results.json``, the scores and the ground truth.
    """
    if not 0.0 < remove_share <= 1.0:
        raise RobucapError(f"poison-scan remove_share must be in (0, 1], got {remove_share}")
    datamodule.tokenizer = module.tokenizer
    dataset = datamodule.eval_dataset("train")
    records = dataset.store.records
    features, ids = encoder_features(module.captioner, evaluation_loader(module, dataset, None, batch_size=256))
    if [r.image_id for r in records] != list(ids):
        raise RobucapError("poison-scan: features and training records are out of order")
    scores = spectral_signature_scores(features)
    truth = torch.tensor([r.poisoned for r in records], dtype=torch.bool)
    flagged = ranking_quality(scores, truth, round(remove_share * len(records)))
    at_truth = ranking_quality(scores, truth, int(truth.sum()))
    block = {
        "method": "spectral_signature",
        "remove_share": remove_share,
        "k": flagged["k"],
        "precision": flagged["precision"],
        "recall": flagged["recall"],
        "r_precision": at_truth["precision"],
        "auroc": flagged["auroc"],
        "n": flagged["n"],
        "n_poisoned": flagged["n_poisoned"],
        "feature_dim": int(features.shape[1]),
    }
    return ScanResult(block, scores, truth)


def histogram_png(result: ScanResult) -> bytes:
    """Score histograms of clean and poisoned training images."""
    plt = pyplot()
    scores, truth = result.scores, result.is_poisoned
    fig, ax = plt.subplots(figsize=(7, 3))
    top = float(scores.max()) if scores.numel() else 1.0
    bins = torch.linspace(0, top if top > 0 else 1.0, 50).tolist()
    ax.hist(scores[~truth].tolist(), bins=bins, alpha=0.6, label="clean")
    ax.hist(scores[truth].tolist(), bins=bins, alpha=0.6, label="poisoned")
    ax.set(xlabel="spectral signature score", ylabel="training images", yscale="log")
    ax.legend()
    return figure_png(fig)


def poison_scan_main(argv: list[str]) -> int:
    """``robucap poison-scan`` argument parsing."""
    parser = argparse.ArgumentParser(
        prog="robucap poison-scan",
        description="Rank training images by the spectral signature of a model's encoder features.",
    )
    parser.add_argument("--ckpt", required=True, help="checkpoint of a model trained on the data")
    parser.add_argument("--config", required=True, help="YAML whose data: section describes the (poisoned) data")
    parser.add_argument("--data-root", default=None, help="override data.root")
    parser.add_argument("--remove-share", type=float, default=0.45, help="share flagged (1.5 x a 0.3 rate)")
    parser.add_argument("--out", required=True, help="output directory (results.json, report.html)")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    module = CaptioningModule.load_from_checkpoint(checkpoint_path(args.ckpt), map_location="cpu", weights_only=True)
    options = data_options(Path(args.config), args.data_root)
    try:
        datamodule = CaptionDataModule(**options)
    except TypeError as error:
        raise RobucapError(f"config file {args.config}: bad data: options ({error})") from error
    datamodule.prepare_data()
    result = scan(module, datamodule, args.remove_share)
    block = result.block
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    report = Report("robucap poison-scan")
    report.heading("Spectral-signature scan of the training images")
    report.paragraph(
        f"Checkpoint {args.ckpt}; {block['n']} training images, {block['n_poisoned']} poisoned (ground truth from "
        f"the poisoning manifest). Flagging the top {block['remove_share']:.0%} ({block['k']} images)."
    )
    report.table(
        ["k", "precision", "recall", "precision at k = #poisoned", "ROC AUC"],
        [[block["k"], block["precision"], block["recall"], block["r_precision"], block["auroc"]]],
    )
    report.image(histogram_png(result), "score histogram")
    results = {"poison_scan": block, "checkpoint": str(args.ckpt), "seconds": round(time.perf_counter() - start, 1)}
    results["report"] = str(out / "report.html")
    (out / "results.json").write_text(json.dumps(results, indent=2, sort_keys=True), encoding="utf-8")
    report.write(out / "report.html")
    print(
        f"robucap poison-scan done: precision {block['precision']:.3f}, recall {block['recall']:.3f} at "
        f"k = {block['k']}, ROC AUC {block['auroc']:.3f}; report: {out / 'report.html'}"
    )
    return 0
