"""Accuracy against the image preprocessing: the same heads and seeds on vectors made at several image sizes.

    python bench/preprocessing.py [--json] [--seeds 0 1 2] [--only NAME ...] [--params params.yaml]

Needs the prepared manifest (`make demo` or `dvc repro prepare`). For each preprocessing below, the image vectors are
computed into a temporary cache (the project's cache is neither read nor changed), then scored on the test split: the
fusion head of params.yaml (trained with each seed, calibrated on validation as the train stage does) and a logistic
regression on the standardised concatenated vectors. Figures are means over the seeds; accuracy and macro-F1.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from _cli import parser as bench_parser
from _cli import report

from fusionops.config import load_params
from fusionops.data.manifest import read_manifest
from fusionops.evaluate import scores
from fusionops.features import extract_features, load_features
from fusionops.labels import LabelTask
from fusionops.train import calibrate, fit, predict_logits, split_data, training_labels

# name -> features.image overrides (None: the model's own config)
PREPROCESSING = {
    "128px_no_crop": {"image_size": 128, "crop_pct": 1.0},
    "192px_no_crop": {"image_size": 192, "crop_pct": 1.0},
    "224px_no_crop": {"image_size": 224, "crop_pct": 1.0},
    "model_config": {"image_size": None, "crop_pct": None},  # tf_efficientnet_lite0: 224 px, crop 0.875 from 256
    "256px_crop_0.875": {"image_size": 256, "crop_pct": None},
    "320px_no_crop": {"image_size": 320, "crop_pct": 1.0},
}


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--only", nargs="+", choices=list(PREPROCESSING), default=list(PREPROCESSING))
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression
    from sklearn.multiclass import OneVsRestClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    params = load_params(args.params)
    prepared = read_manifest(params.data.prepared)
    task = LabelTask(training_labels(prepared, params.data.separator), separator=params.data.separator)
    result: dict = {"label_column": params.data.label_column, "head": params.train.head,
                    "modality_dropout": params.train.modality_dropout, "seeds": args.seeds}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.only:
            image = params.features.image.model_copy(update=PREPROCESSING[name])
            settings = params.features.model_copy(update={"cache_dir": Path(tmp) / "cache",
                                                          "out_dir": Path(tmp) / name, "image": image})
            extract_features(prepared, Path(params.data.images_root), settings)
            features = load_features(settings.out_dir)
            train, val, test = (split_data(prepared, features, task, s) for s in ("train", "val", "test"))
            y = test.y.numpy()

            runs = []
            for seed in args.seeds:
                model, _, _ = fit(train, val, task, params.train.model_copy(update={"seed": seed}),
                                  modalities=("image", "text"), name=f"{name} seed {seed}")
                temperature, decides = calibrate(model, val, task)
                runs.append(scores(y, decides.decide_logits(predict_logits(model, test.image, test.text),
                                                            temperature)))
            linear = LogisticRegression(max_iter=3000)
            logreg = make_pipeline(StandardScaler(), OneVsRestClassifier(linear) if task.multi else linear)
            logreg.fit(torch.cat([train.image, train.text], 1).numpy(), train.y.numpy())
            baseline = scores(y, logreg.predict(torch.cat([test.image, test.text], 1).numpy()))
            result[name] = {
                "head": {k: round(float(np.mean([r[k] for r in runs])), 4) for k in ("accuracy", "macro_f1")},
                "logreg_concat": {k: round(baseline[k], 4) for k in ("accuracy", "macro_f1")},
            }
    report(result, json_only=args.json)


if __name__ == "__main__":
    main()
