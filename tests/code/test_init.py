"""`fusionops init`: proposals from a manifest's contents, the images checked, params.yaml edited in place."""

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fusionops.data.manifest import read_manifest
from fusionops.errors import DataError, UserError
from fusionops.init import propose, set_params
from helpers import make_shapes

ROOT = Path(__file__).resolve().parents[2]
FUSIONOPS = str(Path(sys.executable).with_name("fusionops"))


@pytest.fixture(scope="module")
def shapes(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes") / "data", per_kind=3)


def test_the_columns_of_a_manifest_unlike_the_demo(shapes):
    proposal = propose(read_manifest(shapes / "manifest.csv"), shapes, {})
    assert proposal.columns == {"id": "uid", "image": "file", "text": "caption", "label": "shape", "group": None}
    assert proposal.others["label"] == ["colour"] and not proposal.image_notes
    assert "4 classes" in proposal.why["label"] and "each item is its own group" in proposal.why["group"]


def test_the_demos_own_columns_are_found_again(slice_dir):
    """On the demo data init proposes what params.yaml says: the group is emoji_id (both drawings of one emoji)."""
    proposal = propose(read_manifest(slice_dir / "manifest.csv"), slice_dir, {})
    data = yaml.safe_load((ROOT / "params.yaml").read_text())["data"]
    assert proposal.columns == {"id": data["id_column"], "image": data["image_column"], "text": data["text_column"],
                                "label": data["label_column"], "group": data["group_column"]}


def test_what_is_given_wins_and_a_wrong_name_gets_a_did_you_mean(shapes):
    df = read_manifest(shapes / "manifest.csv")
    assert propose(df, shapes, {"label": "colour", "group": None}).columns["label"] == "colour"
    with pytest.raises(UserError, match=r"--label-column 'colur' is not a column of the manifest \(did you mean "
                                        r"'colour'\?\); its columns: uid, file, caption, shape, colour"):
        propose(df, shapes, {"label": "colur"})


def test_a_wrong_images_root_names_the_folder_the_paths_are_in(shapes):
    import re

    where = re.escape(str(shapes))
    with pytest.raises(DataError, match=rf"none of \d+ sampled image paths .* \(they are under {where}: "
                                        rf"--images-root {where}\)"):
        propose(read_manifest(shapes / "manifest.csv"), shapes / "pictures", {}, manifest_dir=shapes)


def test_a_broken_image_in_the_sample_is_reported(shapes, tmp_path):
    import shutil

    copy = Path(shutil.copytree(shapes, tmp_path / "data"))
    first = read_manifest(copy / "manifest.csv")["file"].iloc[0]
    (copy / first).write_bytes(b"not a png")
    notes = propose(read_manifest(copy / "manifest.csv"), copy, {}).image_notes
    assert len(notes) == 1 and notes[0].startswith(f"{first!r}: ") and "not an image" in notes[0]


def test_params_yaml_keeps_its_comments_and_layout():
    text = (ROOT / "params.yaml").read_text()
    edited = set_params(text, {"data.label_column": "shape", "data.group_column": None,
                               "registry.model_name": "my-shapes", "data.text_column": "null"})
    before, after = text.splitlines(), edited.splitlines()
    changed = {i for i, (a, b) in enumerate(zip(before, after, strict=True)) if a != b}
    assert len(before) == len(after) and len(changed) == 4
    for i in changed:  # same key, same comment at the same column
        assert before[i].split(":")[0] == after[i].split(":")[0] and before[i].find("#") == after[i].find("#")
    params = yaml.safe_load(edited)
    assert params["data"]["label_column"] == "shape" and params["data"]["group_column"] is None
    assert params["data"]["text_column"] == "null"  # a column named null is quoted, not read as nothing
    assert params["registry"]["model_name"] == "my-shapes"


@pytest.mark.parametrize("values, check", [
    ({"data.label_column": "a: b # c"}, lambda p: p["data"]["label_column"] == "a: b # c"),
    ({"registry.http_timeout": 5}, lambda p: p["registry"]["http_timeout"] == 5),
    ({"data.not_yet": "x"}, lambda p: p["data"]["not_yet"] == "x"),  # a key the file lacks: added to its section
    ({"features.text.new": 1}, lambda p: p["features"]["text"]["new"] == 1 and p["features"]["text"]["pooling"]),
    ({"brand.new": "y"}, lambda p: p["brand"] == {"new": "y"}),  # a section the file lacks
])
def test_any_value_is_written_so_that_it_reads_back(values, check):
    assert check(yaml.safe_load(set_params((ROOT / "params.yaml").read_text(), values)))


def test_a_section_is_not_overwritten_by_a_value():
    with pytest.raises(UserError, match="features.image holds a section"):
        set_params((ROOT / "params.yaml").read_text(), {"features.image": "x"})


def test_init_dry_run_writes_nothing_and_init_writes_params(shapes, tmp_path):
    project = tmp_path / "my-shapes"
    project.mkdir()
    (project / "params.yaml").write_text((ROOT / "params.yaml").read_text())
    (project / ".dvc").mkdir()
    args = [FUSIONOPS, "init", "--manifest", str(shapes / "manifest.csv"), "--images-root", str(shapes)]
    dry = subprocess.run([*args, "--dry-run"], cwd=project, capture_output=True, text=True, timeout=300)
    assert dry.returncode == 0 and "nothing written" in dry.stdout
    assert (project / "params.yaml").read_text() == (ROOT / "params.yaml").read_text()
    done = subprocess.run([*args, "--group-column", "colour"], cwd=project, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    data = yaml.safe_load((project / "params.yaml").read_text())
    assert data["data"]["manifest"] == str(shapes / "manifest.csv")  # outside the project: absolute
    assert data["data"]["group_column"] == "colour" and data["registry"]["model_name"] == "my-shapes"
    wrong = subprocess.run([*args, "--text-column", "captoin"], cwd=project, capture_output=True, text=True,
                           timeout=300)
    assert wrong.returncode == 1 and "did you mean 'caption'?" in wrong.stderr and "Traceback" not in wrong.stderr
    assert len(wrong.stderr.strip().splitlines()) == 1

