"""Helpers for building small real datasets from the demo data."""

from __future__ import annotations

import shutil
from pathlib import Path

import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "data" / "demo" / "emoji-v1"
SLICE_CATEGORIES = ("Animals & Nature", "Food & Drink", "Travel & Places", "Flags")


def take_slice(manifest: pd.DataFrame, groups_per_label: int, *, skip_groups: int = 0) -> pd.DataFrame:
    """Both drawings of the first `groups_per_label` emoji (after `skip_groups`) of each slice category."""
    parts = []
    for category in SLICE_CATEGORIES:
        rows = manifest[manifest["category"] == category]
        groups = rows["emoji_id"].drop_duplicates().iloc[skip_groups:skip_groups + groups_per_label]
        parts.append(rows[rows["emoji_id"].isin(groups)])
    return pd.concat(parts, ignore_index=True)


def write_dataset(rows: pd.DataFrame, folder: Path) -> Path:
    """A dataset folder like data/raw: manifest.csv plus the images it names (copied from the demo)."""
    for rel in rows["image"]:
        (folder / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(DEMO / rel, folder / rel)
    rows.to_csv(folder / "manifest.csv", index=False)
    return folder


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares width x height pixels, with no pixel data: what a decompression bomb shows."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


def make_zoo(folder: Path, base: pd.DataFrame) -> tuple[Path, dict[str, str], list[str]]:
    """A dataset of `base` rows plus every odd-but-valid and every broken kind of row.

    Returns the manifest path, {bad item_id: the column to blame} and the ids of the odd-but-valid rows.
    """
    from PIL import Image

    write_dataset(base, folder)
    images = folder / "zoo"
    images.mkdir()
    template = base.iloc[0].to_dict()
    rows, bad, odd = [], {}, []

    def add(item_id: str, image: str, text: str = "red apple", label: str | None = None, *, blame: str = ""):
        rows.append({**template, "item_id": item_id, "emoji_id": item_id, "image": image, "text": text,
                     "category": label or template["category"]})
        (bad.__setitem__(item_id, blame) if blame else odd.append(item_id))

    # Odd but valid: every image mode, tiny images, long and non-Latin text.
    Image.new("CMYK", (40, 30), (0, 255, 255, 0)).save(images / "cmyk.jpg")
    Image.new("I;16", (40, 30), 40000).save(images / "gray16.png")
    Image.new("L", (40, 30), 90).save(images / "gray8.png")
    Image.new("RGB", (1, 1), (200, 10, 10)).save(images / "one.png")
    Image.new("RGBA", (20, 20), (0, 0, 0, 0)).save(images / "transparent.png")
    Image.new("P", (20, 20), 0).save(images / "palette.png", transparency=0)
    for name in ("cmyk.jpg", "gray16.png", "gray8.png", "one.png", "transparent.png", "palette.png"):
        add(f"odd/{name}", f"zoo/{name}")
    add("odd/long-text", "zoo/one.png", text="a very long description " * 400)
    add("odd/unicode", "zoo/one.png", text="🍎 りんご 苹果 pomme à la crème")

    # Broken, each in its own row.
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)
    real = (folder / base["image"].iloc[0]).read_bytes()
    (images / "truncated.png").write_bytes(real[: len(real) // 2])
    (images / "empty.png").write_bytes(b"")
    (images / "text.png").write_text("this is a text file, not a picture\n")
    (images / "bomb.png").write_bytes(_png_header_only(100_000, 100_000))
    (folder.parent / "outside.png").write_bytes(real)
    (images / "escape.png").symlink_to(folder.parent / "outside.png")
    (images / "folder.png").mkdir()
    for item_id, image in [("bad/corrupt", "zoo/corrupt.png"), ("bad/truncated", "zoo/truncated.png"),
                           ("bad/empty-file", "zoo/empty.png"), ("bad/missing", "zoo/missing.png"),
                           ("bad/dotdot", "../outside.png"), ("bad/absolute", str(folder.parent / "outside.png")),
                           ("bad/symlink", "zoo/escape.png"), ("bad/bomb", "zoo/bomb.png"),
                           ("bad/not-an-image", "zoo/text.png"), ("bad/folder", "zoo/folder.png")]:
        add(item_id, image, blame="image")
    add("bad/empty-text", "zoo/one.png", text="", blame="text")
    add("bad/blank-text", "zoo/one.png", text="  \t ", blame="text")
    add("bad/no-label", "zoo/one.png", label=" ", blame="label")
    rows.append({**template, "image": "zoo/one.png"})  # a second row with the first row's id
    bad[template["item_id"]] = "item_id"

    manifest = pd.concat([base, pd.DataFrame(rows)], ignore_index=True)
    manifest.to_csv(folder / "manifest.csv", index=False)
    return folder / "manifest.csv", bad, odd


def sh(*args: str, cwd: Path) -> str:
    """Run a command with this interpreter's bin first on PATH; fail the test with its output if it fails."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def make_project(root: Path, raw: Path, *, model_name: str, flows: bool = False, **overrides: dict) -> Path:
    """A git + DVC project like a fresh clone after `make data`, holding `raw` as data/raw; `overrides`: params
    sections to update (e.g. data={"label_column": "subcategory"}).

    flows=True adds flows/ and prefect.yaml, for a Prefect worker to run its deployments.
    """
    import sys

    import yaml

    root.mkdir(parents=True, exist_ok=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore") + (("prefect.yaml",) if flows else ()):
        shutil.copyfile(ROOT / name, root / name)
    if flows:
        shutil.copytree(ROOT / "flows", root / "flows", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(ROOT / "src/fusionops", root / "src/fusionops", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copytree(raw, root / "data/raw")
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["train"].update(max_epochs=30, patience=5)
    params["registry"]["model_name"] = model_name
    for section, values in overrides.items():
        params.setdefault(section, {}).update(values)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    sh("git", "init", "-q", "-b", "main", cwd=root)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "add", "-q", "data/raw", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "-c", "user.name=t", "-c", "user.email=t@example.com", "commit", "-qm", "data v1", cwd=root)
    return root


def load_flow(name: str):
    """A module of flows/ by file name (flows/ is a folder of scripts, not a package)."""
    import importlib.util
    import sys

    sys.path.insert(0, str(ROOT / "flows"))
    spec = importlib.util.spec_from_file_location(name, ROOT / "flows" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SHAPES = ("circle", "square", "triangle", "star")
COLOURS = {"red": (220, 30, 30), "green": (30, 160, 60), "blue": (40, 70, 220), "yellow": (235, 200, 20)}


def make_shapes(folder: Path, per_kind: int = 5, size: int = 32) -> Path:
    """A dataset of one's own, unlike the demo: `per_kind` drawings of each coloured shape (4 x 4 kinds), with a
    caption, in a manifest whose columns are uid, file, caption, shape, colour (80 items by default)."""
    import math

    from PIL import Image, ImageDraw

    rows = []
    (folder / "pictures").mkdir(parents=True, exist_ok=True)
    for shape in SHAPES:
        for colour, rgb in COLOURS.items():
            for k in range(per_kind):
                image = Image.new("RGB", (size, size), (255, 255, 255))
                draw = ImageDraw.Draw(image)
                m = 2 + k % 6  # margins vary from drawing to drawing
                box = (m, m, size - 1 - m, size - 1 - m)
                if shape == "circle":
                    draw.ellipse(box, fill=rgb)
                elif shape == "square":
                    draw.rectangle(box, fill=rgb)
                elif shape == "triangle":
                    draw.polygon([(size / 2, m), (size - 1 - m, size - 1 - m), (m, size - 1 - m)], fill=rgb)
                else:
                    c, r = size / 2, size / 2 - m
                    draw.polygon([(c + (r if i % 2 == 0 else r / 2.5) * math.cos(math.pi * i / 5 - math.pi / 2),
                                   c + (r if i % 2 == 0 else r / 2.5) * math.sin(math.pi * i / 5 - math.pi / 2))
                                  for i in range(10)], fill=rgb)
                name = f"pictures/{shape}-{colour}-{k}.png"
                image.save(folder / name)
                rows.append({"uid": f"{shape[:2]}{colour[:2]}{k}", "file": name,
                             "caption": f"a {colour} {shape}" if k % 2 else f"{colour} {shape}, drawing {k}",
                             "shape": shape, "colour": colour})
    pd.DataFrame(rows).to_csv(folder / "manifest.csv", index=False)
    return folder
