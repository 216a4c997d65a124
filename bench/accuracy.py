"""Accuracy of the fusion heads on the prepared demo data, with the missing-modality figures and two baselines.

    python bench/accuracy.py [--json] [--seeds 0 1 2] [--heads concat:0.5 gated:0.5 ...] [--train KEY=VALUE ...]
                             [--params params.yaml]

Needs `dvc repro` to have run (the prepared manifest and the cached vectors). For each head and modality-dropout
setting (--heads, head:rate), the fused head is trained with each seed and scored on the test split: whole, with
every text removed, and with every image removed (zero vectors). Measured in the same run: the same head on one
modality (the ablations) and a logistic regression on the concatenated vectors. With train.text_encoder: finetune
(params.yaml, or --train text_encoder=finetune) the text encoder is tuned with each seed as the train stage tunes it,
with the text-only head (that head is the text-only figure), and the fused heads and the logistic regression read
its vectors. --train overrides train.* keys for the whole run (e.g. logit_adjustment=1). Figures are means over the
seeds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from _cli import mean, report, train_overrides, trained_on
from _cli import parser as bench_parser

from fusionops.evaluate import scores
from fusionops.train import calibrate, finetune_text, fit, predict_logits, split_data

HEADS = ["concat:0.0", "concat:0.5", "gated:0.0", "gated:0.5", "attention:0.0", "attention:0.5"]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--heads", nargs="+", default=HEADS, help="head:modality_dropout settings to train")
    parser.add_argument("--train", nargs="*", default=[], metavar="KEY=VALUE", help="train.* overrides")
    args = parser.parse_args()

    params, prepared, features, task = trained_on(args.params)
    base = params.train.model_validate({**params.train.model_dump(), **train_overrides(args.train)})
    test_y = split_data(prepared, features, task, "test").y.numpy()

    def calibrated(model, val):
        """The head as the train stage leaves it: calibrated (multi-label: thresholds tuned) on validation."""
        return (model, *calibrate(model, val, task))

    def score(fitted, image, text) -> dict:
        model, temperature, decides = fitted
        return scores(test_y, decides.decide_logits(predict_logits(model, image, text), temperature))

    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    runs: dict[str, list] = {}
    for seed in args.seeds:
        settings = base.model_copy(update={"seed": seed})
        frozen = {s: split_data(prepared, features, task, s) for s in ("train", "val", "test")}
        model, _, _ = fit(frozen["train"], frozen["val"], task, settings, modalities=("image",), name="image_only")
        runs.setdefault("image_only", []).append(score(calibrated(model, frozen["val"]), frozen["test"].image,
                                                       frozen["test"].text))
        vectors = features
        if settings.text_encoder == "finetune":
            with tempfile.TemporaryDirectory(prefix="fusionops-accuracy-") as tmp:
                fp = params.features.model_copy(update={"cache_dir": Path(tmp) / "cache"})
                tuned = finetune_text(prepared, features, task, settings, fp, Path(tmp) / "checkpoints")
            vectors, text_head = tuned.features, tuned.model
        data = {s: split_data(prepared, vectors, task, s) for s in ("train", "val", "test")}
        train, val, test = data["train"], data["val"], data["test"]
        if settings.text_encoder != "finetune":
            text_head, _, _ = fit(train, val, task, settings, modalities=("text",), name="text_only")
        runs.setdefault("text_only", []).append(score(calibrated(text_head, val), test.image, test.text))

        logreg = LogisticRegression(max_iter=3000)
        baseline = make_pipeline(StandardScaler(), OneVsRestClassifier(logreg) if task.multi else logreg)
        baseline.fit(torch.cat([train.image, train.text], 1).numpy(), train.y.numpy())
        runs.setdefault("logreg_concat", []).append(
            scores(test_y, baseline.predict(torch.cat([test.image, test.text], 1).numpy())))
        for setting in args.heads:
            head, rate = setting.split(":")
            model, _, _ = fit(train, val, task, settings.model_copy(update={"head": head,
                                                                            "modality_dropout": float(rate)}),
                              modalities=("image", "text"), name=f"{setting} seed {seed}")
            fitted = calibrated(model, val)
            runs.setdefault(f"{head}_dropout_{rate}", []).append({
                "test": score(fitted, test.image, test.text),
                "no_text": score(fitted, test.image, torch.zeros_like(test.text)),
                "no_image": score(fitted, torch.zeros_like(test.image), test.text)})

    result: dict = {"label_column": params.data.label_column, "label_mode": params.data.label_mode,
                    "test_items": len(test_y), "seeds": args.seeds, "text_encoder": base.text_encoder,
                    "train_overrides": train_overrides(args.train)}
    for name in ("image_only", "text_only", "logreg_concat"):
        result[name] = mean(runs.pop(name))
    best_single = max(result["image_only"]["accuracy"], result["text_only"]["accuracy"])
    for name, rows in runs.items():
        row = {part: mean([r[part] for r in rows]) for part in ("test", "no_text", "no_image")}
        row["gain_vs_best_single"] = round(row["test"]["accuracy"] - best_single, 4)
        row["no_text_vs_image_only"] = round(row["no_text"]["accuracy"] / result["image_only"]["accuracy"], 3)
        row["no_image_vs_text_only"] = round(row["no_image"]["accuracy"] / result["text_only"]["accuracy"], 3)
        result[name] = row
    report(result, json_only=args.json)


if __name__ == "__main__":
    main()
