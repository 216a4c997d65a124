"""Accuracy of the fusion heads on the prepared demo data, with the missing-modality figures and two baselines.

    python bench/accuracy.py [--json] [--seeds 0 1 2] [--params params.yaml]

Needs `dvc repro` to have run (the prepared manifest and the cached vectors). For each head and modality-dropout
setting, the fused head is trained with each seed and scored on the test split: whole, with every text removed, and
with every image removed (zero vectors). Measured in the same run: the same head on one modality (the ablations) and
a logistic regression on the concatenated frozen vectors. Figures are means over the seeds.
"""

from __future__ import annotations

import numpy as np
import torch
from _cli import parser as bench_parser
from _cli import report, trained_on

from fusionops.evaluate import scores
from fusionops.train import calibrate, fit, predict_logits, split_data

SETTINGS = [("concat", 0.0), ("concat", 0.5), ("gated", 0.0), ("gated", 0.5), ("attention", 0.0), ("attention", 0.5)]


def mean(rows: list[dict]) -> dict:
    return {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("accuracy", "macro_f1")}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()

    params, prepared, features, task = trained_on(args.params)
    train, val, test = (split_data(prepared, features, task, s) for s in ("train", "val", "test"))
    y = test.y.numpy()

    def trained(settings, modalities, name):
        """The head as the train stage leaves it: calibrated (multi-label: thresholds tuned) on validation."""
        model, _, _ = fit(train, val, task, settings, modalities=modalities, name=name)
        return (model, *calibrate(model, val, task))

    def score(fitted, image, text) -> dict:
        model, temperature, decides = fitted
        return scores(y, decides.decide_logits(predict_logits(model, image, text), temperature))

    result: dict = {"label_column": params.data.label_column, "label_mode": params.data.label_mode,
                    "test_items": len(y), "seeds": args.seeds}
    for name, modalities in (("image_only", ("image",)), ("text_only", ("text",))):
        runs = []
        for seed in args.seeds:
            model = trained(params.train.model_copy(update={"seed": seed}), modalities, f"{name} seed {seed}")
            runs.append(score(model, test.image, test.text))
        result[name] = mean(runs)

    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    logreg = LogisticRegression(max_iter=3000)
    baseline = make_pipeline(StandardScaler(), OneVsRestClassifier(logreg) if task.multi else logreg)
    baseline.fit(torch.cat([train.image, train.text], 1).numpy(), train.y.numpy())
    result["logreg_concat"] = scores(y, baseline.predict(torch.cat([test.image, test.text], 1).numpy()))

    best_single = max(result["image_only"]["accuracy"], result["text_only"]["accuracy"])
    for head, rate in SETTINGS:
        runs = {"test": [], "no_text": [], "no_image": []}
        for seed in args.seeds:
            settings = params.train.model_copy(update={"head": head, "modality_dropout": rate, "seed": seed})
            model = trained(settings, ("image", "text"), f"{head} dropout {rate} seed {seed}")
            runs["test"].append(score(model, test.image, test.text))
            runs["no_text"].append(score(model, test.image, torch.zeros_like(test.text)))
            runs["no_image"].append(score(model, torch.zeros_like(test.image), test.text))
        row = {part: mean(rows) for part, rows in runs.items()}
        row["gain_vs_best_single"] = round(row["test"]["accuracy"] - best_single, 4)
        row["no_text_vs_image_only"] = round(row["no_text"]["accuracy"] / result["image_only"]["accuracy"], 3)
        row["no_image_vs_text_only"] = round(row["no_image"]["accuracy"] / result["text_only"]["accuracy"], 3)
        result[f"{head}_dropout_{rate}"] = row
    report(result, json_only=args.json)


if __name__ == "__main__":
    main()
