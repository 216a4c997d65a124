"""The features stage with the real encoders on real images: cache behaviour and alignment."""

import numpy as np
import pandas as pd
import pytest
import yaml

from fusionops.config import FeaturesParams, ImageEncoderParams
from fusionops.data.manifest import read_manifest
from fusionops.features import extract_features, load_features


@pytest.fixture()
def params(tmp_path):
    return FeaturesParams(out_dir=tmp_path / "out", cache_dir=tmp_path / "cache", num_workers=0, shard_size=16)


def test_second_run_computes_nothing_and_new_items_cost_only_themselves(slice_dir, params):
    df = read_manifest(slice_dir / "manifest.csv")
    first, rest = df.iloc[:60], df
    stats = extract_features(first, slice_dir, params)
    assert stats["image"]["computed"] == first["image"].nunique()
    assert stats["text"]["computed"] == first["text"].nunique()
    vectors_first = load_features(params.out_dir)

    again = extract_features(first, slice_dir, params)
    assert again["image"]["computed"] == 0 and again["text"]["computed"] == 0
    np.testing.assert_array_equal(load_features(params.out_dir).image, vectors_first.image)

    grown = extract_features(rest, slice_dir, params)
    assert grown["image"]["computed"] == len(rest) - len(first)
    assert grown["text"]["computed"] == rest["text"].nunique() - first["text"].nunique()
    fs = load_features(params.out_dir)
    assert fs.item_ids == rest["item_id"].tolist()
    assert fs.image.shape == (len(rest), 1280) and fs.text.shape == (len(rest), 384)
    np.testing.assert_allclose(np.linalg.norm(fs.text, axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(fs.image[:60], vectors_first.image)


def test_vectors_follow_content_not_row(slice_dir, params):
    df = read_manifest(slice_dir / "manifest.csv").iloc[:20]
    extract_features(df, slice_dir, params)
    forward = load_features(params.out_dir)
    extract_features(df.iloc[::-1].reset_index(drop=True), slice_dir, params)
    backward = load_features(params.out_dir)
    np.testing.assert_array_equal(forward.image, backward.image[::-1])
    np.testing.assert_array_equal(forward.text, backward.text[::-1])


def test_other_preprocessing_gets_its_own_key_space(slice_dir, params):
    df = read_manifest(slice_dir / "manifest.csv").iloc[:8]
    extract_features(df, slice_dir, params)
    other = params.model_copy(update={"image": ImageEncoderParams(image_size=96)})
    stats = extract_features(df, slice_dir, other)
    assert stats["image"]["computed"] == 8 and stats["text"]["computed"] == 0
    assert len(list(params.cache_dir.glob("*/encoder.json"))) == 3  # two image key spaces, one text


def test_precision_gets_its_own_key_space(slice_dir, params):
    """bf16 vectors are close to fp32 ones, not equal: a cache must never hand one out for the other."""
    df = read_manifest(slice_dir / "manifest.csv").iloc[:4]
    bf16 = extract_features(df, slice_dir, params.model_copy(update={"precision": "bf16"}))
    fp32 = extract_features(df, slice_dir, params.model_copy(update={"precision": "fp32"}))
    assert bf16["image"]["computed"] == fp32["image"]["computed"] == 4
    assert load_features(params.out_dir).encoders["image"]["precision"] == "fp32"


def test_damaged_shard_is_recomputed_not_trusted(slice_dir, params):
    df = read_manifest(slice_dir / "manifest.csv").iloc[:8]
    extract_features(df, slice_dir, params)
    good = load_features(params.out_dir).image
    image_space = next(p.parent for p in params.cache_dir.glob("tf_efficientnet*/encoder.json"))
    assert len(list(params.cache_dir.glob("tf_efficientnet*/encoder.json"))) == 1
    for shard in image_space.glob("shard-*.npz"):
        shard.write_bytes(shard.read_bytes()[:100])  # truncated, as by a full disk
    stats = extract_features(df, slice_dir, params)
    assert stats["image"]["computed"] == 8
    assert len(list(image_space.glob("*.damaged"))) == 1  # set aside, not deleted and not read again
    np.testing.assert_allclose(load_features(params.out_dir).image, good, rtol=1e-5, atol=1e-5)


def test_shard_of_wrong_shape_is_set_aside_and_recomputed(slice_dir, params):
    df = read_manifest(slice_dir / "manifest.csv").iloc[:8]
    extract_features(df, slice_dir, params)
    good = load_features(params.out_dir).image
    image_space = next(p.parent for p in params.cache_dir.glob("tf_efficientnet*/encoder.json"))
    (shard,) = image_space.glob("shard-*.npz")
    with np.load(shard) as z:  # a readable shard whose vectors are not this encoder's (a half-copied cache...)
        keys, vectors = z["keys"], z["vectors"]
    with open(shard, "wb") as f:
        np.savez(f, keys=keys, vectors=vectors[:, :100])
    stats = extract_features(df, slice_dir, params)
    assert stats["image"]["computed"] == 8 and len(list(image_space.glob("*.damaged"))) == 1
    np.testing.assert_allclose(load_features(params.out_dir).image, good, rtol=1e-5, atol=1e-5)


def test_outputs_are_written_whole(slice_dir, params):
    df = read_manifest(slice_dir / "manifest.csv").iloc[:4]
    extract_features(df, slice_dir, params)
    leftovers = [p.name for p in params.out_dir.iterdir() if p.name.endswith(".tmp")]
    assert leftovers == []
    assert sorted(p.name for p in params.out_dir.iterdir()) == ["image.npy", "meta.json", "text.npy"]


def test_texts_embed_with_meaning(text_encoder):
    v = text_encoder.encode(["red apple", "green apple", "police car"])
    assert v[0] @ v[1] > v[0] @ v[2]
    assert pd.Series(np.linalg.norm(v, axis=1)).round(5).eq(1).all()


def test_unreadable_image_names_the_row(slice_dir, params, tmp_path):
    from fusionops.errors import DataError

    df = read_manifest(slice_dir / "manifest.csv").iloc[:3].copy()
    df.loc[1, "image"] = "images/none.png"
    with pytest.raises(DataError, match=f"row '{df.loc[1, 'item_id']}': cannot read image"):
        extract_features(df, slice_dir, params)
    assert not params.out_dir.exists()  # nothing half-written


def test_odd_but_valid_images_and_texts_encode(zoo, params, image_encoder):
    from fusionops.features.image import load_rgb

    folder, manifest, _, odd = zoo
    df = read_manifest(manifest)
    df = df[df["item_id"].isin(odd)].reset_index(drop=True)
    sizes = {tuple(image_encoder.transform(load_rgb(folder / p)).shape) for p in df["image"]}
    assert sizes == {(3, 224, 224)}  # every mode, every size: the same tensor shape
    assert image_encoder.pixels([folder / p for p in df["image"]]).shape == (len(df), 3, 224, 224)  # in one batch
    extract_features(df, folder, params)
    fs = load_features(params.out_dir)
    assert np.isfinite(fs.image).all() and np.isfinite(fs.text).all()
    long_text = fs.text[df.index[df["item_id"] == "odd/long-text"][0]]
    np.testing.assert_allclose(np.linalg.norm(long_text), 1.0, rtol=1e-5)  # truncated by the encoder, not refused


def test_cache_info_and_prune_keep_only_the_current_key_spaces(slice_dir, params, tmp_path):
    from fusionops.features.cache import describe, prune
    from fusionops.features.extract import current_key_spaces

    df = read_manifest(slice_dir / "manifest.csv").iloc[:6]
    extract_features(df, slice_dir, params)
    old = params.model_copy(update={"image": ImageEncoderParams(image_size=96)})
    extract_features(df, slice_dir, old)
    spaces = {s["key_space"]: s for s in describe(params.cache_dir)}
    assert len(spaces) == 3
    assert {s["entries"] for k, s in spaces.items() if k.startswith("tf_")} == {df["image"].nunique()}
    current = current_key_spaces(params)
    assert current < set(spaces)
    assert [r["key_space"] for r in prune(params.cache_dir, current, dry_run=True)] == list(set(spaces) - current)
    assert len(describe(params.cache_dir)) == 3  # a dry run removes nothing

    # the same through the command line, with a params.yaml whose features section is `params`
    from typer.testing import CliRunner

    from fusionops.cli import app

    yaml_path = tmp_path / "params.yaml"
    yaml_path.write_text(yaml.safe_dump({"features": params.model_dump(mode="json")}))
    (stale,) = set(spaces) - current

    def cli(*args):
        result = CliRunner().invoke(app, ["cache", *args, "--params", str(yaml_path)], env={"COLUMNS": "250"})
        assert result.exit_code == 0, result.output
        return result.output

    info = cli("info")
    assert all(k in info for k in spaces) and "3 key space(s)" in info
    assert f"would remove {stale}" in cli("prune", "--dry-run")
    assert len(describe(params.cache_dir)) == 3
    assert f"removed {stale}" in cli("prune")
    assert {s["key_space"] for s in describe(params.cache_dir)} == current
    assert "nothing to prune" in cli("prune")
    assert extract_features(df, slice_dir, params)["image"]["computed"] == 0  # what is in use survived
    # A cache_dir that does not exist (a typo): info says so; prune has nothing to do and says why.
    elsewhere = params.model_copy(update={"cache_dir": tmp_path / "no-cache"})
    yaml_path.write_text(yaml.safe_dump({"features": elsewhere.model_dump(mode="json")}))
    assert "no feature cache at" in cli("prune")
    missing = CliRunner().invoke(app, ["cache", "info", "--params", str(yaml_path)], env={"COLUMNS": "250"})
    assert missing.exit_code == 1 and "no feature cache at" in str(missing.exception)


def test_worker_processes_give_the_same_vectors(slice_dir, params, tmp_path):
    """DataLoader workers (a separate, single-threaded `fusionops features`) change nothing but the speed: with the
    same settings on the same machine, the same bytes."""
    import subprocess
    import sys
    from pathlib import Path

    import yaml

    df = read_manifest(slice_dir / "manifest.csv").iloc[:40]
    extract_features(df, slice_dir, params.model_copy(update={"precision": "fp32"}))
    df.assign(split="train").to_csv(tmp_path / "prepared.csv", index=False)
    settings = {"data": {"prepared": str(tmp_path / "prepared.csv"), "images_root": str(slice_dir)},
                "features": {"out_dir": str(tmp_path / "workers-out"), "cache_dir": str(tmp_path / "workers-cache"),
                             "num_workers": 2, "batch_size": params.batch_size, "shard_size": 512,
                             "precision": "fp32"}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(settings))
    fusionops = str(Path(sys.executable).with_name("fusionops"))
    result = subprocess.run([fusionops, "features"], cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    theirs, ours = load_features(tmp_path / "workers-out"), load_features(params.out_dir)
    np.testing.assert_array_equal(theirs.image, ours.image)  # other shards (512 there, 16 here): same batches
    np.testing.assert_array_equal(theirs.text, ours.text)


def test_what_was_cached_before_changes_no_vector(slice_dir, params, tmp_path):
    """Every forward pass has a shape fixed by the settings (images: batch_size; texts: their own length), so the
    vectors of a run that found part of the data cached are the bytes of a cold run's."""
    df = read_manifest(slice_dir / "manifest.csv").iloc[:40]
    extract_features(df, slice_dir, params)
    cold = load_features(params.out_dir)
    warm = params.model_copy(update={"cache_dir": tmp_path / "warm", "out_dir": tmp_path / "warm-out"})
    extract_features(df.iloc[7:18], slice_dir, warm)  # 11 items first: other batches, other texts beside them
    assert extract_features(df, slice_dir, warm)["image"]["computed"] == 40 - 11
    np.testing.assert_array_equal(load_features(warm.out_dir).image, cold.image)
    np.testing.assert_array_equal(load_features(warm.out_dir).text, cold.text)


def test_a_text_vector_does_not_depend_on_the_texts_beside_it(text_encoder):
    texts = ["red apple", "a green apple on a wooden table, seen from above", "police car", "x",
             "grinning face with big eyes", "flag: France"]
    alone = np.stack([text_encoder.encode([t], batch_size=4)[0] for t in texts])
    np.testing.assert_array_equal(text_encoder.encode(texts, batch_size=4), alone)
    others = text_encoder.encode(["something else entirely", *texts[::-1], "and one more"], batch_size=4)
    np.testing.assert_array_equal(others[1:-1][::-1], alone)
    # Another batch size is another shape: equal up to float rounding only (what the design gives across shapes
    # and CPU kinds; measured here: at most a few 1e-8).
    np.testing.assert_allclose(text_encoder.encode(texts, batch_size=16), alone, rtol=0, atol=1e-6)
