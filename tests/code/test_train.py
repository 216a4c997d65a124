import json

import pandas as pd
import pytest
import torch

from fusionops.config import TextFinetuneParams, TrainParams
from fusionops.errors import UserError
from fusionops.labels import LabelTask
from fusionops.models import HEADS, create_head, load_model, save_model
from fusionops.train import VARIANTS, fit, predict_logits, split_data, train, training_labels

FAST = TrainParams(text_encoder="frozen", max_epochs=40, patience=8, seed=0, device="cpu")


@pytest.fixture(scope="module")
def splits(slice_prepared, slice_features):
    task = LabelTask(training_labels(slice_prepared))
    return task.labels, *(split_data(slice_prepared, slice_features, task, s) for s in ("train", "val", "test"))


@pytest.mark.parametrize("name", sorted(HEADS))
@pytest.mark.parametrize("modalities", list(VARIANTS.values()))
def test_every_head_keeps_the_contract(name, modalities):
    head = create_head(name, image_dim=12, text_dim=5, num_classes=3, modalities=modalities).eval()
    img, txt = torch.randn(4, 12), torch.randn(4, 5)
    z = head.forward_features(img, txt)
    assert z.shape[0] == 4 and head.forward_head(z).shape == (4, 3)
    assert torch.equal(head(img, txt), head.forward_head(z))
    if modalities == ("image",):  # a one-modality head must not look at the other modality at all
        assert torch.equal(head(img, txt), head(img, torch.randn(4, 5)))
    if modalities == ("text",):
        assert torch.equal(head(img, txt), head(torch.randn(4, 12), txt))
    if len(modalities) == 2:  # ...and a fused head looks at both
        assert not torch.equal(head(img, txt), head(img, torch.randn(4, 5)))
        assert not torch.equal(head(img, txt), head(torch.randn(4, 12), txt))


def test_a_diverging_run_says_to_lower_the_learning_rate(splits):
    from fusionops.errors import UserError

    labels, tr, va, _ = splits
    with pytest.raises(UserError, match=r"training fusion diverged: the loss is (nan|inf) at epoch \d+ .*lower"):
        fit(tr, va, LabelTask(labels), FAST.model_copy(update={"lr": 1e9, "max_epochs": 5}),
            modalities=("image", "text"), name="fusion")


def test_unknown_head_lists_the_known_ones():
    with pytest.raises(UserError, match="known heads: .*concat"):
        create_head("nope", image_dim=1, text_dim=1, num_classes=2)


def test_training_learns_and_is_deterministic(splits):
    labels, tr, va, te = splits
    model_a, history_a, best_a = fit(tr, va, LabelTask(labels), FAST, modalities=("image", "text"))
    model_b, history_b, best_b = fit(tr, va, LabelTask(labels), FAST, modalities=("image", "text"))
    assert history_a.equals(history_b)
    for a, b in zip(model_a.state_dict().values(), model_b.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    accuracy = (predict_logits(model_a, te.image, te.text).argmax(1) == te.y).float().mean().item()
    assert accuracy > 2 / len(labels)  # 4 classes: chance is 0.25
    assert best_a["val_macro_f1"] == history_a["val_macro_f1"].max()
    assert len(history_a) <= best_a["epoch"] + FAST.patience  # early stopping stopped


def test_saved_model_predicts_the_same(tmp_path, splits):
    labels, tr, va, te = splits
    model, _, _ = fit(tr, va, LabelTask(labels), FAST.model_copy(update={"max_epochs": 3}),
                      modalities=("image", "text"))
    config = {"head": FAST.head, "head_kwargs": {"image_dim": tr.image.shape[1], "text_dim": tr.text.shape[1],
                                                "num_classes": len(labels), "modalities": ["image", "text"]}}
    save_model(tmp_path, model, config)
    loaded, loaded_config = load_model(tmp_path)
    assert loaded_config == config
    assert torch.equal(predict_logits(model, te.image, te.text), predict_logits(loaded, te.image, te.text))
    assert (tmp_path / "model.safetensors").read_bytes()[8:9] == b"{"  # safetensors header, not a pickle


def test_train_stage_writes_fusion_and_ablations(tmp_path, slice_prepared, slice_features, slice_dir):
    params = FAST.model_copy(update={"out_dir": tmp_path / "models", "history": tmp_path / "history",
                                     "timing": tmp_path / "timing.json", "max_epochs": 5})
    summary = train(slice_prepared, slice_features, params)
    assert set(summary) == set(VARIANTS)
    for folder in ("fusion", "ablations/image_only", "ablations/text_only"):
        _, config = load_model(tmp_path / "models" / folder)
        assert config["encoders"] == slice_features.encoders
        assert config["temperature"] > 0 and "train_seconds" not in config  # the weights' folder stays reproducible
    timing = json.loads(params.timing.read_text())["train_seconds"]
    assert set(timing) == set(VARIANTS) and all(seconds > 0 for seconds in timing.values())
    _, image_only = load_model(tmp_path / "models/ablations/image_only")
    assert image_only["head_kwargs"]["modalities"] == ["image"]
    # A one-modality head answers from that modality only, and refuses items without it.
    from fusionops.errors import DataError
    from fusionops.predict import Predictor

    predictor = Predictor(tmp_path / "models/ablations/image_only")
    rows = slice_prepared.head(2)
    paths = [slice_dir / p for p in rows["image"]]
    assert predictor.predict(paths, rows["text"].tolist())["modalities"].tolist() == ["image", "image"]
    with pytest.raises(DataError, match=r"1 item\(s\) have no image \(rows 1\), the one modality this model reads"):
        predictor.predict([paths[0], None], rows["text"].tolist())
    for variant in VARIANTS:
        history = pd.read_csv(tmp_path / "history" / f"{variant}.csv")
        assert list(history.columns) == ["epoch", "train_loss", "val_accuracy", "val_macro_f1", "lr"]
        assert history["epoch"].tolist() == list(range(1, len(history) + 1))
        assert summary[variant]["val_macro_f1"] == history["val_macro_f1"].max()


def test_predictor_copes_with_a_missing_modality_and_refuses_other_encoder_weights(tmp_path, splits, slice_features,
                                                                                 slice_prepared, slice_dir):
    """A model trained on other weights than the ones installed must not predict silently wrong answers."""
    from fusionops.errors import UserError as Refused
    from fusionops.predict import Predictor

    labels, tr, va, te = splits
    model, _, _ = fit(tr, va, LabelTask(labels), FAST.model_copy(update={"max_epochs": 1}),
                      modalities=("image", "text"))
    encoders = {k: dict(v) for k, v in slice_features.encoders.items()}
    config = {"head": FAST.head, "labels": labels, "encoders": encoders,
              "head_kwargs": {"image_dim": tr.image.shape[1], "text_dim": tr.text.shape[1],
                              "num_classes": len(labels), "modalities": ["image", "text"]}}
    save_model(tmp_path / "ok", model, config)
    assert Predictor(tmp_path / "ok").labels == labels
    assert isinstance(Predictor(tmp_path / "ok", num_workers="auto").num_workers, int)  # as features.num_workers
    _predicts_with_a_modality_missing(Predictor(tmp_path / "ok"), model, slice_features, slice_prepared, slice_dir)
    encoders["text"]["weights_sha256"] = "0" * 64
    save_model(tmp_path / "other", model, config)
    with pytest.raises(Refused, match="text encoder weights"):
        Predictor(tmp_path / "other")


def _predicts_with_a_modality_missing(predictor, model, features, prepared, images_root):
    """No image (None, "", b"") or no text (None, blank): the head sees a zero vector there, the item's own vector
    elsewhere; an item with neither is refused by row number."""
    from fusionops.errors import DataError

    rows = prepared.head(4)
    paths = [images_root / p for p in rows["image"]]
    texts = rows["text"].tolist()
    image, text = predictor.encode(paths, texts)
    assert (image.abs().amax(1) > 0).all() and (text.abs().amax(1) > 0).all()
    result = predictor.predict([paths[0], None, "", paths[3].read_bytes()], [None, texts[1], texts[2], "  "])
    assert result["modalities"].tolist() == ["image", "text", "text", "image"]
    zero_image, zero_text = torch.zeros_like(image[0]), torch.zeros_like(text[0])
    expected = predict_logits(model, torch.stack([image[0], zero_image, zero_image, image[3]]),
                              torch.stack([zero_text, text[1], text[2], zero_text])).softmax(1)
    assert result["confidence"].to_numpy() == pytest.approx(expected.amax(1).numpy(), abs=1e-5)
    # A blank path or a NaN (an empty cell of a DataFrame) is a missing image too, never a file to open.
    assert predictor.predict([float("nan"), " "], texts[:2])["modalities"].tolist() == ["text", "text"]
    with pytest.raises(DataError, match=r"neither an image nor a text \(rows 1\)"):
        predictor.predict([paths[0], b""], [texts[0], None])
    # Images that cannot be read are named by row, each with what to do; the readable ones are not blamed.
    missing = images_root / "no-such-image.png"
    with pytest.raises(DataError, match="3 image\\(s\\) cannot be used") as raised:
        predictor.predict([paths[0], missing, b"not an image", images_root], texts[:4])
    message = str(raised.value)
    assert f"row 1: file {missing} not found" in message and "row 2: image bytes (12 B) is not an image" in message
    assert f"row 3: {images_root} cannot be read (IsADirectoryError" in message
    assert "row 0" not in message


def test_gated_head_weighs_each_item_and_ignores_a_missing_modality():
    head = create_head("gated", image_dim=12, text_dim=5, num_classes=3).eval()
    img, txt = torch.randn(4, 12), torch.randn(4, 5)
    txt[1] = 0  # item 1 has no text
    img[2] = 0  # item 2 has no image
    img[3], txt[3] = 0, 0  # item 3 has neither
    weights = head.gate_weights(img, txt)
    assert torch.allclose(weights["image"][:3] + weights["text"][:3], torch.ones(3))
    assert weights["text"][1] == 0 and weights["image"][1] == 1
    assert weights["image"][2] == 0 and weights["text"][2] == 1
    assert weights["image"][3] == weights["text"][3] == 0 and torch.isfinite(head(img, txt)).all()
    assert 0 < weights["image"][0] < 1  # a real mix for a complete item
    # Without text, whatever the text vector's other rows hold, item 1's answer depends on its image only.
    other = txt.clone()
    other[0] = torch.randn(5)
    assert torch.equal(head(img, txt)[1], head(img, other)[1])


def test_modality_dropout_removes_one_modality_of_the_chosen_share():
    from fusionops.train import drop_modalities

    img, txt = torch.ones(10_000, 3), torch.ones(10_000, 2)
    dropped_img, dropped_txt = drop_modalities(img, txt, 0.3, torch.Generator().manual_seed(0))
    no_image, no_text = (dropped_img == 0).all(1), (dropped_txt == 0).all(1)
    assert not (no_image & no_text).any()  # never both
    assert abs((no_image | no_text).float().mean().item() - 0.3) < 0.02
    assert abs(no_image.float().mean().item() - 0.15) < 0.02


def test_training_with_modality_dropout_is_deterministic_and_copes_without_text(splits):
    labels, tr, va, te = splits
    settings = FAST.model_copy(update={"modality_dropout": 0.5, "head": "gated"})
    model_a, history_a, _ = fit(tr, va, LabelTask(labels), settings, modalities=("image", "text"))
    _, history_b, _ = fit(tr, va, LabelTask(labels), settings, modalities=("image", "text"))
    assert history_a.equals(history_b)
    no_text = predict_logits(model_a, te.image, torch.zeros_like(te.text)).argmax(1)
    assert (no_text == te.y).float().mean().item() > 1 / len(labels)  # above chance from the image alone


@pytest.mark.parametrize("schedule", ["constant", "cosine", "plateau"])
def test_learning_rate_schedules(schedule):
    from fusionops.train import lr_scheduler

    params = FAST.model_copy(update={"lr_schedule": schedule, "lr_warmup_epochs": 2, "max_epochs": 12,
                                     "patience": 6, "lr": 1.0})
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=params.lr)
    scheduler = lr_scheduler(optimizer, params)
    rates = []
    for _ in range(params.max_epochs):
        rates.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step(0.5) if schedule == "plateau" else scheduler.step()  # plateau: val macro-F1 never improves
    if schedule == "plateau":  # halved after more than patience // 3 = 2 stalled epochs, then again, and again
        assert rates[:4] == [1.0] * 4 and rates[-1] == 0.125 and sorted(rates, reverse=True) == rates
        return
    assert rates[:3] == pytest.approx([1 / 3, 2 / 3, 1.0])  # linear warm-up
    if schedule == "constant":
        assert rates[3:] == [1.0] * 9
    else:  # half-way through what follows the warm-up: half the rate; towards the end: near 0
        assert rates[2 + 5] == pytest.approx(0.5) and rates[-1] < 0.05
        assert sorted(rates[2:], reverse=True) == rates[2:]


TUNED = FAST.model_copy(update={"text_encoder": "finetune", "max_epochs": 5, "text_finetune": TextFinetuneParams(
    max_epochs=2, layers=1, batch_texts=8)})


@pytest.fixture(scope="module")
def tuned_project(tmp_path_factory, slice_prepared, slice_features):
    """The train stage with train.text_encoder: finetune on the slice, in a folder of its own."""
    from fusionops.config import FeaturesParams

    root = tmp_path_factory.mktemp("tuned")
    params = TUNED.model_copy(update={"out_dir": root / "models", "history": root / "history",
                                      "timing": root / "timing.json", "checkpoint_dir": root / "checkpoints"})
    features = FeaturesParams(out_dir=root / "features", cache_dir=root / "cache", num_workers=0)
    summary = train(slice_prepared, slice_features, params, features_params=features)
    return root, params, features, summary


def test_text_batches_hold_every_item_of_a_text_once_per_epoch():
    from fusionops.text_tuning import text_batches

    text = torch.tensor([3, 1, 3, 0, 2, 1, 4, 4, 5, 0])
    lengths = torch.tensor([5, 2, 9, 3, 7, 4])
    batches = text_batches(text, lengths, 2, torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(len(text)))  # each item once
    texts_per_batch = [set(text[b].tolist()) for b in batches]
    assert all(len(t) <= 2 for t in texts_per_batch)
    assert sum(len(t) for t in texts_per_batch) == 6  # each distinct text in exactly one batch: one forward pass
    again = text_batches(text, lengths, 2, torch.Generator().manual_seed(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, again, strict=True))  # the same seed, the same epoch


def test_finetune_tunes_the_text_encoder_and_the_model_carries_it(tuned_project, slice_prepared, slice_features,
                                                                   slice_dir):
    from fusionops.evaluate import model_features
    from fusionops.features.text import TUNED_WEIGHTS
    from fusionops.predict import Predictor

    root, params, features, summary = tuned_project
    assert set(summary) == set(VARIANTS)
    frozen_id = slice_features.encoders["text"]["id"]
    tuned = {}
    for variant in ("fusion", "ablations/text_only"):
        folder = params.out_dir / variant
        _, config = load_model(folder)
        record = config["encoders"]["text"]
        assert record["bundled"] and record["tuned_from"] == frozen_id and record["id"] != frozen_id
        assert (folder / "text_encoder" / TUNED_WEIGHTS).read_bytes()[8:9] == b"{"  # safetensors, not a pickle
        tuned[variant] = record["id"]
    assert tuned["fusion"] == tuned["ablations/text_only"]  # one tuned encoder, carried by both models
    _, image_only = load_model(params.out_dir / "ablations/image_only")
    assert image_only["encoders"] == slice_features.encoders  # it reads no text
    # The tuned vectors are cached under the tuned encoder's key space: evaluate reads them, and they are the ones
    # the served model computes from the files.
    folder = params.out_dir / "fusion"
    _, config = load_model(folder)
    vectors = model_features(folder, config, slice_features, slice_prepared["text"].tolist(), features)
    assert any(p.name.startswith(tuned["fusion"]) for p in features.cache_dir.iterdir())
    assert not torch.allclose(torch.from_numpy(vectors.text), torch.from_numpy(slice_features.text), atol=1e-3)
    rows = slice_prepared.head(4)
    predictor = Predictor(folder, device="cpu")
    _, text = predictor.encode([slice_dir / p for p in rows["image"]], rows["text"].tolist())
    torch.testing.assert_close(text, torch.from_numpy(vectors.text[:4]), atol=1e-5, rtol=0)
    answers = predictor.predict([None, *[slice_dir / p for p in rows["image"][1:]]], rows["text"].tolist())
    assert answers["modalities"].tolist() == ["text", "image+text", "image+text", "image+text"]


def test_finetune_is_deterministic(tuned_project, slice_prepared, slice_features, tmp_path):
    root, params, features, _ = tuned_project
    again = params.model_copy(update={"out_dir": tmp_path / "models", "history": tmp_path / "history",
                                      "timing": tmp_path / "timing.json"})
    train(slice_prepared, slice_features, again, features_params=features)
    for path in ("fusion/model.safetensors", "fusion/text_encoder/model.safetensors",
                 "ablations/text_only/model.safetensors"):
        assert (tmp_path / "models" / path).read_bytes() == (params.out_dir / path).read_bytes(), path


def test_a_tuned_encoder_that_was_changed_is_refused(tuned_project, tmp_path):
    import shutil

    from fusionops.predict import Predictor

    root, params, _, _ = tuned_project
    folder = tmp_path / "fusion"
    shutil.copytree(params.out_dir / "fusion", folder)
    from fusionops.config import TextEncoderParams
    from fusionops.features.text import build_text_encoder

    base = build_text_encoder(TextEncoderParams())  # other weights of the same shape: the pretrained ones
    shutil.copyfile(next(base.folder.glob("*.safetensors")), folder / "text_encoder" / "model.safetensors")
    with pytest.raises(UserError, match="tuned text encoder .* is not the one this model was trained with"):
        Predictor(folder, device="cpu")


def test_finetune_settings_are_checked():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="layers must be 'all' or at least 1"):
        TrainParams(text_finetune={"layers": 0})
    with pytest.raises(ValidationError, match="text_encoder"):
        TrainParams(text_encoder="tuned")
