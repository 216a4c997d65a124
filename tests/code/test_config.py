import re
from pathlib import Path

import pytest
import yaml

from fusionops.config import Params, ParamsError, find_params, load_params

ROOT = Path(__file__).resolve().parents[2]


def test_project_params_load_and_anchor_paths():
    params = load_params(ROOT / "params.yaml")
    assert params.data.manifest == ROOT / "data/raw/manifest.csv"
    assert params.registry.tracking_uri == f"sqlite:///{ROOT}/mlflow.db"


def test_project_params_equal_the_defaults():
    """params.yaml spells out every default: a value changed in one place only is a bug."""
    written = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert Params.model_validate(written).model_dump() == Params().model_dump()


@pytest.mark.parametrize("text, needle", [
    ("train: {lrr: 0.1}", "train.lrr: unknown key (did you mean lr?)"),
    ("validate: {reprot: x}", "validate.reprot: unknown key (did you mean report?)"),
    ("features: {image: {zzz: 1}}", "features.image.zzz: unknown key; known: backbone, weights, image_size"),
    ("split: {train: 0.9, val: 0.2}", "must be < 1"),
    ("features: {precision: fp8}", "features.precision"),
    ("train: [1, 2", "not valid YAML: line 1, column 13: expected ',' or ']', but got '<stream end>' "
                     "(while parsing a flow sequence that starts at line 1, column 8)"),
    ("data:\n\tlabel_column: x", "not valid YAML: line 2, column 1: found character '\\t' that cannot start any token"),
    ("features: {image: {std: [0.2, 0, 0.2]}}", "features.image.std.1: Input should be greater than 0"),
    ("features: {num_workers: -1}", "features.num_workers"),
    ("train: {seed: -1}", "train.seed: Input should be greater than or equal to 0"),
    ("promote: {seed: 4294967296}", "promote.seed: Input should be less than 4294967296"),
    ("registry: {tracking_uri: mlflow.db}", "'mlflow.db' is a database file: write sqlite:///mlflow.db"),
    ("registry: {tracking_uri: 'htp://localhost:5000'}", "unknown scheme 'htp'"),
    ("registry: {model_name: team/model}", "registry.model_name 'team/model': MLflow needs a name without"),
    ("features: {image: {std: [.inf, 1, 1]}}", "features.image.std.0: Input should be a finite number"),
    ("data: {label_column: item_id}", "data.id_column and data.label_column are both 'item_id'"),
    (b"data: {label_column: cat\xe9gorie}", "is not UTF-8 text"),
])
def test_bad_params_name_the_key(tmp_path, text, needle):
    path = tmp_path / "params.yaml"
    path.write_bytes(text) if isinstance(text, bytes) else path.write_text(text)
    with pytest.raises(ParamsError, match=re.escape(needle)):
        load_params(path)


@pytest.mark.parametrize("uri", ["mlruns", "/srv/mlruns", "HTTP://tracking:5000", "azureml://workspace",
                                 "postgresql+psycopg2://user@db/mlflow", "databricks"])
def test_tracking_uris_mlflow_accepts_are_accepted(uri):
    assert Params.model_validate({"registry": {"tracking_uri": uri}}).registry.tracking_uri == uri


def test_missing_params_file_says_what_to_do(tmp_path):
    with pytest.raises(ParamsError, match="--params"):
        load_params(tmp_path / "nope.yaml")
    with pytest.raises(ParamsError, match="is a folder: give the params file"):
        load_params(tmp_path)


def test_params_are_found_from_a_subfolder_of_the_project(tmp_path, monkeypatch):
    (tmp_path / "params.yaml").write_text("train: {lr: 0.001}\n")  # above the project: not the project's
    project = tmp_path / "project"
    (project / ".dvc").mkdir(parents=True)
    (project / "params.yaml").write_text("train: {lr: 0.002}\n")
    (project / "data/raw").mkdir(parents=True)
    monkeypatch.chdir(project / "data/raw")
    params = load_params()
    assert params.train.lr == 0.002 and params.data.manifest == project / "data/raw/manifest.csv"
    assert find_params() == project / "params.yaml"
    for given in ("params.yaml", "./params.yaml", "other.yaml"):  # a path the user gave is taken as given
        assert find_params(given) == Path(given)
        with pytest.raises(ParamsError, match="not found"):
            load_params(given)
    (project / "data/params.yaml").symlink_to(project / "gone.yaml")  # the nearest wins, even a broken one...
    with pytest.raises(ParamsError, match="is a link to .*gone.yaml, which does not exist"):
        load_params()
    (project / "data/params.yaml").unlink()
    (project / "data/params.yaml").mkdir()  # ...or a folder of that name: said, not passed over
    with pytest.raises(ParamsError, match="is a folder"):
        load_params()
    (project / "data/raw/params.yaml").write_text("train: {lr: 0.003}\n")
    assert load_params().train.lr == 0.003
    (project / "configs").mkdir()  # a linked params.yaml: paths are relative to the link's folder, as for DVC
    (project / "configs/prod.yaml").write_text("train: {lr: 0.004}\n")
    (project / "data/raw/params.yaml").unlink()
    (project / "data/raw/params.yaml").symlink_to(project / "configs/prod.yaml")
    params = load_params()
    assert params.train.lr == 0.004 and params.data.manifest == project / "data/raw/data/raw/manifest.csv"

    # The search ends at the project's top folder (.dvc or .git); outside any project only ./params.yaml counts.
    (project / "data/raw/params.yaml").unlink()
    (project / "data/params.yaml").rmdir()
    (project / "params.yaml").unlink()
    assert find_params() == Path("params.yaml")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert find_params() == Path("params.yaml")


def test_digest_depends_on_values_not_on_location(tmp_path):
    for sub in ("a", "b"):
        (tmp_path / sub).mkdir()
        (tmp_path / sub / "params.yaml").write_text("train: {lr: 0.01}\n")
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "params.yaml").write_text("train: {lr: 0.02}\n")
    a, b, c = (load_params(tmp_path / s / "params.yaml").digest() for s in "abc")
    assert a == b != c
