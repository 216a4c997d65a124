"""End-to-end prediction speed: decode + both encoders + head, as `fusionops predict` and the pyfunc run it.

    python bench/predict.py [--json] [--items N] [--params params.yaml]

Uses the trained model in models/fusion (run `make demo` or `dvc repro` first) and the prepared demo manifest.
Measures the model as trained and with int8 dynamic quantization (head + text encoder), in one run, and the test
accuracy of both. The last line of output is a JSON object.
"""

from __future__ import annotations

import time
from pathlib import Path

from _cli import parser as bench_parser
from _cli import report

from fusionops.config import load_params
from fusionops.data.manifest import read_manifest
from fusionops.predict import Predictor
from fusionops.train import model_dir


def measure(predictor: Predictor, images: list[Path], texts: list[str]) -> float:
    predictor.predict(images[:64], texts[:64])  # warm-up: first-batch allocations, lazy inits
    start = time.perf_counter()
    predictor.predict(images, texts)
    return len(images) / (time.perf_counter() - start)


def accuracy(predictor: Predictor, images: list[Path], texts: list[str], labels: list[str]) -> float:
    predicted = predictor.predict(images, texts)["label"].tolist()
    return sum(p == t for p, t in zip(predicted, labels, strict=True)) / len(labels)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--items", type=int, default=1024, help="items to time (from the prepared manifest)")
    args = parser.parse_args()

    params = load_params(args.params)
    prepared = read_manifest(params.data.prepared)
    root = Path(params.data.images_root).resolve()
    timed = prepared.head(args.items)
    test = prepared[prepared["split"] == "test"]
    images, texts = [root / p for p in timed["image"]], timed["text"].tolist()
    test_images, test_texts = [root / p for p in test["image"]], test["text"].tolist()

    result = {"items": len(timed)}
    for name, quantize in (("default", False), ("int8", True)):
        predictor = Predictor(model_dir(params.train.out_dir), quantize=quantize,
                              batch_size=params.features.batch_size, num_workers=params.features.num_workers)
        result[f"items_per_s_{name}"] = round(measure(predictor, images, texts), 1)
        result[f"test_accuracy_{name}"] = round(accuracy(predictor, test_images, test_texts,
                                                         test["label"].tolist()), 4)
        if not quantize:
            result["device"] = predictor.device.type
            result["precision"] = str(predictor.dtype).removeprefix("torch.") if predictor.dtype else "fp32"
    result["int8_speedup"] = round(result["items_per_s_int8"] / result["items_per_s_default"], 3)
    result["int8_accuracy_change"] = round(result["test_accuracy_int8"] - result["test_accuracy_default"], 4)
    result["goal_items_per_s"] = 60
    report(result, json_only=args.json)


if __name__ == "__main__":
    main()
