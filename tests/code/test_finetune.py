"""Fine-tuning the image backbone's last stage: what trains, what is written, and what is never left behind."""

import json
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch

import fusionops.finetune as ft
from fusionops.config import ImageEncoderParams
from fusionops.errors import UserError
from fusionops.features.image import _drop_classifier, build_image_encoder

FUSIONOPS = str(Path(sys.executable).with_name("fusionops"))
ROOT = Path(__file__).resolve().parents[2]
LAST_STAGE = ("blocks.6.", "conv_head.", "bn2.")  # tf_efficientnet_lite0's last block group and the head conv


@pytest.fixture(scope="module")
def few(slice_prepared):
    """Every validation item and 6 training items per label: enough to run an epoch, quickly."""
    train = slice_prepared[slice_prepared["split"] == "train"].groupby("label").head(6)
    return slice_prepared[(slice_prepared["split"] == "val") | slice_prepared.index.isin(train.index)]


@pytest.fixture(scope="module")
def tuned(slice_prepared, slice_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune") / "lite0-ft.safetensors"
    report = ft.finetune(slice_prepared, slice_dir, ImageEncoderParams(), out=out, epochs=2, lr=1e-3, batch_size=32,
                         device="cpu", progress=False)
    return out, report


def test_only_the_last_stage_changes_and_the_file_loads_as_an_encoder(tuned, image_encoder):
    out, report = tuned
    assert report["unfrozen"] == ["blocks.6", "conv_head", "bn2"]
    tuned_encoder = build_image_encoder(ImageEncoderParams(weights=str(out)))
    after = tuned_encoder.load().state_dict()  # strict load, as the features stage does
    before = image_encoder.load().state_dict()
    assert after.keys() == before.keys()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(LAST_STAGE) for k in changed)  # everything else is bit-identical
    assert {"blocks.6.0.conv_pw.weight", "conv_head.weight", "bn2.weight"} <= changed
    assert not any("running_" in k for k in changed)  # BatchNorm statistics stay frozen
    # A new weights hash, the same preprocessing: a new cache key space for the features stage.
    assert tuned_encoder.id != image_encoder.id == report["base_encoder_id"]
    assert tuned_encoder.id == report["encoder_id"] and tuned_encoder.id.split("-p")[-1] == image_encoder.id.split(
        "-p")[-1]


def test_report_is_written_next_to_the_weights(tuned):
    out, report = tuned
    assert report["frozen_part_kept"]  # a few MB: the epochs run only the last stage
    assert json.loads(ft.report_path(out).read_text()) == report
    assert 1 <= report["best_epoch"] <= report["epochs"] <= 2 and len(report["history"]) == report["epochs"]
    assert 0 <= report["val_macro_f1_before"] <= 1 and 0 <= report["val_macro_f1_after"] <= 1
    assert report["device"] == "cpu" and report["seconds"] > 0 and report["seconds_per_epoch"] > 0
    assert 0 < report["trainable_parameters"] < report["total_parameters"]
    assert report["train_items"] > 0 and report["val_items"] > 0


def test_without_memory_for_the_frozen_part_it_runs_every_epoch(few, slice_dir, tmp_path, image_encoder):
    """Same seed, same batches, the same training: only where the last stage's inputs come from differs."""
    out = tmp_path / "ft.safetensors"
    settings = {"epochs": 2, "lr": 1e-3, "batch_size": 16, "device": "cpu", "progress": False}
    report = ft.finetune(few, slice_dir, ImageEncoderParams(), out=out, keep_gb=0, **settings)
    kept = ft.finetune(few, slice_dir, ImageEncoderParams(), out=tmp_path / "kept.safetensors", **settings)
    assert not report["frozen_part_kept"] and kept["frozen_part_kept"]
    for ours, theirs in zip(report["history"], kept["history"], strict=True):
        assert ours["train_loss"] == pytest.approx(theirs["train_loss"], rel=1e-3)
    after = build_image_encoder(ImageEncoderParams(weights=str(out))).load().state_dict()
    before = image_encoder.load().state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith(LAST_STAGE) for k in changed)


def test_pth_output_loads_too(tuned, tmp_path):
    from safetensors.torch import load_file

    out, _ = tuned
    ft._save_weights(tmp_path / "w.pth", load_file(str(out)), {})
    state = build_image_encoder(ImageEncoderParams(weights=str(tmp_path / "w.pth"))).load().state_dict()
    reference = build_image_encoder(ImageEncoderParams(weights=str(out))).load().state_dict()
    assert all(torch.equal(state[k], reference[k]) for k in reference)


def test_a_failed_run_leaves_no_file(few, slice_dir, tmp_path, monkeypatch):
    def fail(*args, **kwargs):  # the first validation, after the first epoch's training steps
        raise RuntimeError("boom")

    monkeypatch.setattr(ft, "_evaluate", fail)
    out = tmp_path / "out" / "ft.safetensors"
    with pytest.raises(RuntimeError, match="boom"):
        ft.finetune(few, slice_dir, ImageEncoderParams(), out=out, epochs=1, batch_size=32, device="cpu",
                    progress=False)
    assert not out.exists() and not ft.report_path(out).exists()


def test_a_failed_write_keeps_the_previous_file(tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "ft.safetensors"
    out.write_bytes(b"previous run")

    def half_written(state, path, metadata=None):
        Path(path).write_bytes(b"half")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", half_written)
    with pytest.raises(OSError, match="disk full"):
        ft._save_weights(out, {"w": torch.ones(2)}, {})
    assert out.read_bytes() == b"previous run" and [p.name for p in tmp_path.iterdir()] == [out.name]


@pytest.mark.parametrize("replay", [False, True])
def test_frozen_part_runs_without_gradients(image_encoder, replay):
    model = image_encoder.load()
    stage = ft.last_stage(model, (3, 64, 64))
    for name, p in model.named_parameters():
        p.requires_grad_(name in set(stage.parameters))
    seen = []
    model.blocks[5].register_forward_hook(lambda m, args, output: seen.append(output))
    tail = ft._Tail(model, model.get_submodule(stage.entry), (3, 64, 64))
    x = torch.rand(2, 3, 64, 64)
    if replay:  # the frozen part ran once before; the step starts at the last stage
        x = tail.capture(x)[1]
    tail.run(x, replay=replay, grad=True).sum().backward()
    assert torch.is_grad_enabled()
    assert seen[-1].grad_fn is None and not seen[-1].requires_grad
    assert all(p.grad is None for n, p in model.named_parameters() if not n.startswith(LAST_STAGE))
    assert all(p.grad is not None for n, p in model.named_parameters() if n.startswith(LAST_STAGE))


@pytest.mark.parametrize("backbone", ["tf_efficientnet_lite0", "resnet18", "vit_tiny_patch16_224",
                                      "torchvision:mobilenet_v3_small"])
def test_starting_at_the_last_stage_gives_the_whole_forward(backbone):
    """What the epochs train on (the kept inputs of the last stage, replayed) is what the whole model computes."""
    import torchvision

    torch.manual_seed(0)
    if backbone.startswith("torchvision:"):
        model = torchvision.models.get_model(backbone.split(":")[1], weights=None)
        _drop_classifier(model)
    else:
        model = timm.create_model(backbone, pretrained=False, num_classes=0)
    model.eval()
    stage = ft.last_stage(model, (3, 224, 224))
    tail = ft._Tail(model, model.get_submodule(stage.entry), (3, 224, 224))
    x = torch.randn(3, 3, 224, 224)
    out, entry_input = tail.capture(x)
    assert entry_input is not None and entry_input.shape[0] == 3
    assert ft._replays(tail, x, out, entry_input)
    torch.testing.assert_close(tail.run(entry_input, replay=True), out)
    assert not ft._replays(tail, x, out, entry_input.flip(0))  # another item's input: another output


# timm_group: the rule picks exactly timm's last group_matcher(coarse=True) group (timm leaves some head norms and
# head convs in a group of their own: there the rule trains the last stage with them).
@pytest.mark.parametrize("backbone, unfrozen, timm_group", [
    ("tf_efficientnet_lite0", ["blocks.6", "conv_head", "bn2"], True),
    ("resnet18", ["layer4"], True),
    ("vit_tiny_patch16_224", ["blocks.11", "norm"], True),
    ("convnext_atto", ["stages.3", "head"], False),
    ("lcnet_050", ["blocks.5", "conv_head"], False),  # a deeper last stage is still one stage among stages
    ("torchvision:resnet18", ["layer4"], False),
    ("torchvision:efficientnet_b0", ["features.7", "features.8"], False),
    ("torchvision:mobilenet_v3_small", ["features.11", "features.12", "classifier"], False),
    ("torchvision:vit_b_16", ["encoder.layers.encoder_layer_11", "encoder.ln"], False),
])
def test_last_stage_rule_across_architectures(backbone, unfrozen, timm_group):
    import torchvision

    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if backbone.startswith("torchvision:"):
            model = torchvision.models.get_model(backbone.split(":")[1], weights=None)
            _drop_classifier(model)
        else:
            model = timm.create_model(backbone, pretrained=False)
            model.reset_classifier(0)
    stage = ft.last_stage(model.eval(), (3, 224, 224))
    assert stage.modules == unfrozen
    prefixes = tuple(f"{m}." for m in unfrozen)
    assert stage.parameters == [n for n, _ in model.named_parameters() if n.startswith(prefixes)]
    if timm_group:
        groups = timm.models.group_parameters(model, model.group_matcher(coarse=True))
        assert set(groups[max(groups)]) == set(stage.parameters)


def test_unknown_weights_format_is_refused_before_any_work():
    with pytest.raises(UserError, match=r"\.safetensors"):
        ft.check_out_path("weights/ft.bin")


def run(*args, cwd):
    return subprocess.run([FUSIONOPS, *args], cwd=cwd, capture_output=True, text=True, timeout=300)


def test_cli_says_what_to_run_first_and_refuses_bad_paths(tmp_path):
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    result = run("finetune", "--out", str(tmp_path / "w" / "ft.safetensors"), cwd=tmp_path)
    assert result.returncode == 1 and "run `fusionops prepare` first" in result.stderr
    result = run("finetune", "--out", "w/ft.onnx", cwd=tmp_path)
    assert result.returncode == 1 and ".safetensors" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "w").exists()


def test_cli_writes_weights_and_says_what_to_set(tmp_path, slice_dir, few):
    shutil.copyfile(ROOT / "params.yaml", tmp_path / "params.yaml")
    shutil.copytree(slice_dir, tmp_path / "data/raw")
    (tmp_path / "data/prepared").mkdir(parents=True)
    few.to_csv(tmp_path / "data/prepared/manifest.csv", index=False)
    result = run("finetune", "--out", "weights/ft.safetensors", "--epochs", "1", "--batch-size", "32",
                 "--device", "cpu", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "features.image.weights: weights/ft.safetensors" in result.stdout and "dvc repro" in result.stdout
    report = json.loads((tmp_path / "weights/ft.safetensors.json").read_text())
    assert report["encoder_id"] in result.stdout and report["epochs"] == 1
