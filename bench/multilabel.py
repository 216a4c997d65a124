"""Multi-label mode on the demo data: two tags per item (category and drawing style), through the real stages.

    python bench/multilabel.py [--json] [--seeds 0 1 2] [--params params.yaml]

Builds a throw-away project beside the current one: the raw manifest with a `tags` column (the emoji's category,
which the text mostly tells, and its vendor, which only the image shows: "Food & Drink|google"), and params.yaml with
data.label_mode: multi. Then prepare, features (from this project's feature cache: nothing is encoded again), train
and evaluate run on it, once per seed. Prints the test metrics (accuracy = every tag of the item right), the
ablations, the missing-modality figures, calibration and the thresholds tuned on validation; means over the seeds.
Needs the demo data's `category` and `vendor` columns.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import yaml
from _cli import parser as bench_parser
from _cli import report

from fusionops.config import find_params, load_params
from fusionops.data.manifest import read_manifest
from fusionops.data.prepare import prepare
from fusionops.evaluate import evaluate
from fusionops.features import extract_features, load_features
from fusionops.train import model_dir, train

FIGURES = ("accuracy", "macro_f1", "micro_f1", "hamming_loss")


def mean(rows: list[dict]) -> dict:
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in FIGURES}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    params = load_params(args.params)
    raw = yaml.safe_load(find_params(args.params).read_text())
    manifest = read_manifest(params.data.manifest)
    with tempfile.TemporaryDirectory(prefix="fusionops-tags-") as tmp:
        tmp = Path(tmp)
        manifest.assign(tags=manifest["category"] + "|" + manifest["vendor"]).to_csv(tmp / "raw.csv", index=False)
        raw["data"].update(manifest=str(tmp / "raw.csv"), images_root=str(params.data.images_root),
                           label_column="tags", label_mode="multi")
        raw["features"]["cache_dir"] = str(params.features.cache_dir)
        (tmp / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
        tags = load_params(tmp / "params.yaml")
        prepared, _ = prepare(tags.data, tags.split, tags.validate_)
        extract_features(prepared, tags.data.images_root, tags.features)
        features = load_features(tags.features.out_dir)
        runs = []
        for seed in args.seeds:
            settings = tags.train.model_copy(update={"seed": seed})
            train(prepared, features, settings, separator=tags.data.separator, features_params=tags.features)
            metrics = evaluate(prepared, features, settings, tags.evaluate, features_params=tags.features)
            config = json.loads((model_dir(settings.out_dir) / "config.json").read_text())
            runs.append({**metrics, "thresholds": dict(zip(config["labels"], config["thresholds"], strict=True))})

    result: dict = {"tags": "category|vendor", "test_items": runs[0]["test"]["items"], "seeds": args.seeds,
                    "test": mean([r["test"] for r in runs])}
    for part in ("ablation", "missing_modality"):
        result[part] = {k: mean([r[part][k] for r in runs]) for k in runs[0][part]}
    best_single = max(result["ablation"][k]["accuracy"] for k in result["ablation"])
    result["fusion_gain_vs_best_single"] = round(result["test"]["accuracy"] - best_single, 4)
    result["calibration"] = {k: round(float(np.mean([r["calibration"][k] for r in runs])), 4)
                             for k in ("temperature", "ece_before", "ece_after")}
    result[f"thresholds_seed_{args.seeds[0]}"] = runs[0]["thresholds"]
    report(result, json_only=args.json)


if __name__ == "__main__":
    main()
