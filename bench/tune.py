"""The fusion head's settings, one change at a time from params.yaml, chosen on validation and scored on test.

    python bench/tune.py [--json] [--seeds 0 1 2] [--set dropout=0.5 --set lr=1e-3 ...] [--params params.yaml]

Needs `dvc repro` to have run (the prepared manifest and the cached vectors). Each row trains the head of params.yaml
with one `train` setting changed, once per seed, and reports the means of validation and test accuracy / macro-F1:
pick by validation (what `fusionops train` early-stops on), read test only to see whether the choice generalises.
Without --set, a default sweep around the common knobs.
"""

from __future__ import annotations

import numpy as np
import yaml
from _cli import parser as bench_parser
from _cli import report, trained_on
from pydantic import ValidationError

from fusionops.evaluate import scores
from fusionops.models import HEADS
from fusionops.train import calibrate, fit, predict_logits, split_data

SWEEP = ["proj_dim=512", "hidden_dim=1024", "dropout=0.1", "dropout=0.5", "label_smoothing=0.0", "lr=1e-3",
         "lr=1e-4", "modality_dropout=0.3", "weight_decay=0.1", "head=gated"]


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", action="append", dest="changes", metavar="KEY=VALUE",
                        help="a train setting to try (repeatable); each is one row")
    args = parser.parse_args()

    params, prepared, features, task = trained_on(args.params)
    data = {s: split_data(prepared, features, task, s) for s in ("train", "val", "test")}

    def settings(change: dict, seed: int):
        return type(params.train).model_validate({**params.train.model_dump(), **change, "seed": seed})

    changes = {}
    for text in args.changes or SWEEP:  # every change checked before anything trains
        key, _, value = text.partition("=")
        if key not in type(params.train).model_fields or key == "seed" or not value:
            parser.error(f"--set {text}: give KEY=VALUE, KEY one of {', '.join(type(params.train).model_fields)} "
                         "(seeds: --seeds)")
        changes[text] = {key: yaml.safe_load(value)}
        try:
            if settings(changes[text], 0).head not in HEADS:
                parser.error(f"--set {text}: known heads: {', '.join(sorted(HEADS))}")
        except ValidationError as err:
            parser.error(f"--set {text}: {err.errors()[0]['msg']}")

    def row(change: dict) -> dict:
        runs: dict[str, list] = {"val": [], "test": []}
        for seed in args.seeds:
            model, _, _ = fit(data["train"], data["val"], task, settings(change, seed), modalities=("image", "text"),
                              name=f"{change or 'params.yaml'} seed {seed}")
            temperature, decides = calibrate(model, data["val"], task)
            for split in runs:
                logits = predict_logits(model, data[split].image, data[split].text)
                runs[split].append(scores(data[split].y.numpy(), decides.decide_logits(logits, temperature)))
        return {split: {k: round(float(np.mean([r[k] for r in rows])), 4) for k in ("accuracy", "macro_f1")}
                for split, rows in runs.items()}

    result: dict = {"label_column": params.data.label_column, "seeds": args.seeds, "params.yaml": row({})}
    for text, change in changes.items():
        result[text] = row(change)
    best = max((k for k in result if isinstance(result[k], dict)), key=lambda k: result[k]["val"]["macro_f1"])
    result["best_on_val"] = best
    report(result, json_only=args.json)


if __name__ == "__main__":
    main()
