"""Fusion under a change of drawing style: trained on one vendor's drawings, tested on the other vendor's.

    python bench/shift.py [--json] [--seeds 0 1 2] [--column vendor] [--modes frozen finetune] [--train KEY=VALUE ...]

Needs `dvc repro` (the prepared manifest, which keeps the raw manifest's other columns, and the cached vectors). For
each ordered pair A -> B of the column's values, the train stage itself (`fusionops.train.train`, with
train.text_encoder each of --modes) runs on the train and val items of A only, into a temporary folder (models,
checkpoints, the tuned encoder's vectors); the fused model and both one-modality ablations are then scored on the
test items of B (the shift), the fused one also with every text and with every image removed, and on the test
items of A (no shift). The test items are the test split's: no emoji of them was trained on, in either style.
Figures are means over the seeds, all measured in one run.
"""

from __future__ import annotations

import itertools
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from _cli import mean, report, train_overrides
from _cli import parser as bench_parser

from fusionops.config import load_params
from fusionops.data.manifest import read_manifest
from fusionops.evaluate import model_features, scores
from fusionops.features import load_features
from fusionops.labels import LabelTask
from fusionops.models import load_model
from fusionops.train import VARIANTS, model_dir, predict_logits, split_data, train

SAME = "test_same"  # the test items drawn in the training style


def shifted(prepared, features, column: str, source: str, target: str):
    """The manifest (and its vectors) of one direction: train and val items of `source`, the test items of
    `target` as the test split and those of `source` as SAME."""
    test = prepared["split"] == "test"
    keep = ((prepared[column] == source) & ~test) | (test & prepared[column].isin([source, target]))
    df = prepared[keep].copy()
    df.loc[(df["split"] == "test") & (df[column] == source), "split"] = SAME
    return df.reset_index(drop=True), features.select(keep.to_numpy())


def scored(folder: Path, df, features, features_params) -> dict:
    """One trained model's scores on the shifted test items, and the fused one's with a modality removed and on
    the unshifted ones."""
    model, config = load_model(folder)
    task, temperature = LabelTask.from_config(config), config.get("temperature", 1.0)
    vectors = model_features(folder, config, features, df["text"].tolist(), features_params)

    def score(split: str, drop: str | None = None) -> dict:
        data = split_data(df, vectors, task, split)
        image = torch.zeros_like(data.image) if drop == "image" else data.image
        text = torch.zeros_like(data.text) if drop == "text" else data.text
        return scores(data.y.numpy(), task.decide_logits(predict_logits(model, image, text), temperature))

    out = {"test": score("test")}
    if len(config["head_kwargs"]["modalities"]) == 2:
        out |= {"no_text": score("test", "text"), "no_image": score("test", "image"), "same_style": score(SAME)}
    return out


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--column", default="vendor", help="the manifest column whose values are the styles")
    parser.add_argument("--modes", nargs="+", default=["frozen", "finetune"], choices=["frozen", "finetune"])
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="train.* overrides")
    args = parser.parse_args()

    params = load_params(args.params)
    base = params.train.model_validate({**params.train.model_dump(), **train_overrides(args.train)})
    prepared = read_manifest(params.data.prepared)
    features = load_features(params.features.out_dir)
    if args.column not in prepared.columns:
        raise SystemExit(f"{params.data.prepared} has no column {args.column!r}: run `dvc repro` (prepare keeps the "
                         "raw manifest's columns) or give --column")
    values = sorted(set(prepared[args.column]))
    result: dict = {"column": args.column, "label_column": params.data.label_column, "seeds": args.seeds,
                    "train_overrides": train_overrides(args.train), "directions": {}}
    started = time.perf_counter()
    for source, target in itertools.permutations(values, 2):
        df, vectors = shifted(prepared, features, args.column, source, target)
        direction: dict = {"train_items": int((df["split"] == "train").sum()),
                           "test_items": int((df["split"] == "test").sum())}
        for mode in args.modes:
            runs: dict[str, list] = {}
            seconds = []
            for seed in args.seeds:
                with tempfile.TemporaryDirectory(prefix="fusionops-shift-") as tmp:
                    tmp = Path(tmp)
                    tp = base.model_copy(update={
                        "text_encoder": mode, "seed": seed, "out_dir": tmp / "models", "history": tmp / "history",
                        "timing": tmp / "timing.json", "checkpoint_dir": tmp / "checkpoints"})
                    fp = params.features.model_copy(update={"cache_dir": tmp / "cache"})
                    train(df, vectors, tp, separator=params.data.separator, features_params=fp)
                    seconds.append(sum(json.loads((tmp / "timing.json").read_text())["train_seconds"].values()))
                    for variant in VARIANTS:
                        for part, score in scored(model_dir(tp.out_dir, variant), df, vectors, fp).items():
                            key = variant if part == "test" else f"{variant}_{part}"
                            runs.setdefault(key, []).append(score)
            row = {key: mean(rows) for key, rows in runs.items()}
            best_single = max(row["image_only"]["accuracy"], row["text_only"]["accuracy"])
            row["gain_vs_best_single"] = round(row["fusion"]["accuracy"] - best_single, 4)
            row["train_seconds"] = round(float(np.mean(seconds)), 1)
            direction[mode] = row
        if {"frozen", "finetune"} <= set(args.modes):
            direction["finetune_minus_frozen"] = round(
                direction["finetune"]["fusion"]["accuracy"] - direction["frozen"]["fusion"]["accuracy"], 4)
        result["directions"][f"{source}->{target}"] = direction
    result["seconds"] = round(time.perf_counter() - started, 1)
    report(result, json_only=args.json)


if __name__ == "__main__":
    main()
