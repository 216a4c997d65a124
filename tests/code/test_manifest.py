import pandas as pd
import pytest

from fusionops.data.manifest import read_manifest
from fusionops.errors import DataError


def test_csv_and_parquet_read_the_same(tmp_path):
    df = pd.DataFrame({"item_id": ["007", "8"], "image": ["a.png", "b.png"], "text": ["x, y", "🙂 笑"],
                       "category": ["c", "d"]})
    df.to_csv(tmp_path / "m.csv", index=False)
    df.to_parquet(tmp_path / "m.parquet")
    a, b = read_manifest(tmp_path / "m.csv"), read_manifest(tmp_path / "m.parquet")
    pd.testing.assert_frame_equal(a, b)
    assert a["item_id"].tolist() == ["007", "8"]  # ids stay strings, leading zeros kept


def test_not_utf8_names_the_line(tmp_path):
    path = tmp_path / "m.csv"
    path.write_bytes(b"item_id,text\n1,ok\n2,caf\xe9\n")
    with pytest.raises(DataError, match=r"not valid UTF-8 \(line 3"):
        read_manifest(path)


@pytest.mark.parametrize("name, needle", [("missing.csv", "not found"), ("m.json", "unsupported format")])
def test_unreadable_manifest(tmp_path, name, needle):
    if name.endswith(".json"):
        (tmp_path / name).write_text("{}")
    with pytest.raises(DataError, match=needle):
        read_manifest(tmp_path / name)
