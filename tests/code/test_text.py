import hashlib
import json
import zipfile
from concurrent.futures import ProcessPoolExecutor

import pytest

from fusionops.config import PACKAGED_TEXT, TextEncoderParams, load_params
from fusionops.errors import UserError
from fusionops.features import text as text_module
from fusionops.features.text import build_text_encoder, unpack_split_zip

FILES = {"config.json": b'{"hidden_size": 4}', "1_Pooling/config.json": b"{}",
         "model.safetensors": bytes(range(256)) * 400}


def digests(files=FILES) -> dict[str, str]:
    return {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


@pytest.fixture
def parts(tmp_path):
    """A model folder zipped (with a file to leave out) and cut in three, as the mpnet packages ship it."""
    archive = tmp_path / "model.zip"
    with zipfile.ZipFile(archive, "w") as z:
        for name, data in {**FILES, "desktop.ini": b"x"}.items():
            z.writestr(f"model/{name}", data)
    blob = archive.read_bytes()
    cut = [0, len(blob) // 3, 2 * len(blob) // 3, len(blob)]
    paths = []
    for i in range(3):
        paths.append(tmp_path / f"model.zip.{i + 1:03d}")
        paths[-1].write_bytes(blob[cut[i]:cut[i + 1]])
    return paths


def test_split_zip_unpacks_the_listed_files_once(parts, tmp_path):
    target = unpack_split_zip(parts, "model", digests(), tmp_path / "models" / "m")
    assert sorted(str(p.relative_to(target)) for p in target.rglob("*") if p.is_file()) == sorted(FILES)
    assert (target / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]  # no temporary folder left
    for part in parts:  # unpacked once: the parts are not read again
        part.unlink()
    assert unpack_split_zip(parts, "model", digests(), target) == target


def test_a_file_that_is_not_the_pinned_one_is_refused_and_nothing_is_left(parts, tmp_path):
    wrong = {**digests(), "model.safetensors": "0" * 64}
    with pytest.raises(UserError, match="model.safetensors .* is not the expected file"):
        unpack_split_zip(parts, "model", wrong, tmp_path / "models" / "m")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".m.lock"]


@pytest.mark.parametrize("damage", ["drop the last part", "drop a middle part", "truncate a part", "delete a part"])
def test_damaged_parts_say_to_reinstall_and_leave_nothing(parts, tmp_path, damage):
    if damage == "drop the last part":
        parts = parts[:2]
    elif damage == "drop a middle part":
        parts = [parts[0], parts[2]]
    elif damage == "truncate a part":
        parts[1].write_bytes(parts[1].read_bytes()[:100])
    else:
        parts[1].unlink()
    with pytest.raises(UserError, match="reinstall the packages"):
        unpack_split_zip(parts, "model", digests(), tmp_path / "models" / "m")
    assert [p.name for p in (tmp_path / "models").iterdir()] == [".m.lock"]


def test_an_incomplete_folder_or_a_killed_unpack_is_redone(parts, tmp_path):
    target = unpack_split_zip(parts, "model", digests(), tmp_path / "models" / "m")
    (target / "model.safetensors").unlink()
    stale = tmp_path / "models" / ".m.abc.tmp"  # what atomic_dir leaves when its process is killed
    stale.mkdir()
    (stale / ".joined.zip").write_bytes(b"x" * 1000)
    unpack_split_zip(parts, "model", digests(), target)
    assert (target / "model.safetensors").read_bytes() == FILES["model.safetensors"]
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]


def test_an_unwritable_models_folder_says_what_to_set(parts, tmp_path):
    (tmp_path / "file").write_text("not a folder")
    with pytest.raises(UserError, match="FUSIONOPS_MODELS_DIR"):
        unpack_split_zip(parts, "model", digests(), tmp_path / "file" / "m")


def test_two_processes_unpacking_at_once_leave_one_valid_folder(parts, tmp_path):
    target = tmp_path / "models" / "m"
    with ProcessPoolExecutor(2) as pool:
        done = list(pool.map(unpack_split_zip, [parts, parts], ["model"] * 2, [digests()] * 2, [target] * 2))
    assert done == [target, target]
    assert {name: hashlib.sha256((target / name).read_bytes()).hexdigest() for name in FILES} == digests()
    assert sorted(p.name for p in target.parent.iterdir()) == [".m.lock", "m"]


def test_missing_mpnet_packages_name_them(monkeypatch):
    monkeypatch.setitem(text_module.PACKAGED_TEXT, "all-mpnet-base-v2", ("fusionops-no-such-part-001",))
    with pytest.raises(UserError, match="pip install fusionops-no-such-part-001"):
        build_text_encoder(TextEncoderParams(model="all-mpnet-base-v2"))


def test_packaged_names_are_not_paths_and_a_registered_model_requires_their_packages(tmp_path):
    from fusionops.registry import pip_requirements

    (tmp_path / "params.yaml").write_text("features:\n  text:\n    model: all-mpnet-base-v2\n")
    assert load_params(tmp_path / "params.yaml").features.text.model == "all-mpnet-base-v2"
    minilm = pip_requirements("tf_efficientnet_lite0", "package")
    mpnet = pip_requirements("tf_efficientnet_lite0", "all-mpnet-base-v2")
    assert [r.split("==")[0] for r in mpnet if r not in minilm] == list(PACKAGED_TEXT["all-mpnet-base-v2"])
    assert pip_requirements("tf_efficientnet_lite0", "all-MiniLM-L6-v2") == minilm


def test_the_packaged_minilm_by_name_is_the_default_encoder(text_encoder):
    assert build_text_encoder(TextEncoderParams(model="all-MiniLM-L6-v2")).id == text_encoder.id


def test_a_damaged_local_folder_is_named_not_embedded(text_encoder, tmp_path):
    """A copy of the packaged folder with one part broken: an error that names the folder and what to replace,
    never vectors from a tokenizer that maps every word to [UNK]."""
    import shutil

    def copy(name: str):
        folder = tmp_path / name
        shutil.copytree(text_encoder.folder, folder)
        return folder

    folder = copy("no-vocabulary")
    for name in ("tokenizer.json", "vocab.txt"):
        (folder / name).unlink(missing_ok=True)
    with pytest.raises(UserError, match=r"no-vocabulary has no vocabulary \(none of tokenizer\.json, vocab\.txt"):
        build_text_encoder(TextEncoderParams(model=str(folder)))
    folder = copy("bad-config")
    (folder / "config.json").write_text("{not json")
    with pytest.raises(UserError, match="config.json is not a Hugging Face model config"):
        build_text_encoder(TextEncoderParams(model=str(folder)))
    folder = copy("distilbert-style")  # the size under another name (DistilBERT: dim) is still read
    config = json.loads((folder / "config.json").read_text())
    config["dim"] = config.pop("hidden_size")
    (folder / "config.json").write_text(json.dumps(config))
    assert build_text_encoder(TextEncoderParams(model=str(folder))).dim == text_encoder.dim
    folder = copy("cut-weights")
    weights = next(folder.glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(UserError, match="cut-weights cannot be loaded"):
        build_text_encoder(TextEncoderParams(model=str(folder))).encode(["a red apple"])
