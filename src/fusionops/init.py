"""`fusionops init`: point the project at a manifest of one's own, in one command.

It reads the manifest and proposes which column is the id, the image path, the text, the label and (when one does)
the group, from what the columns hold, not from their names alone; checks a sample of the images; and writes the
data.* keys and registry.model_name (from the project folder's name) into params.yaml, editing only those lines, so
the file keeps its comments and layout. Every proposal can be overridden by an option.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import yaml

from fusionops.errors import DataError, UserError

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")
ROLES = ("id", "image", "text", "label", "group")
KEYS = {"id": "data.id_column", "image": "data.image_column", "text": "data.text_column",
        "label": "data.label_column", "group": "data.group_column"}
LABEL_NAMES = re.compile(r"^(y|target)$|label|class|categor|tag", re.I)
ID_NAMES = re.compile(r"(^|[_-])(id|uid|uuid|key)$", re.I)
GROUP_NAMES = re.compile(r"(group|(^|[_-])(id|uid|key))$", re.I)
SAMPLE = 20  # images decoded to check the images root


@dataclass
class Proposal:
    rows: int
    columns: dict[str, str | None]  # role -> the manifest's column (group: None = each item its own group)
    why: dict[str, str]
    others: dict[str, list[str]] = field(default_factory=dict)  # role -> other columns that would do
    image_notes: list[str] = field(default_factory=list)  # sampled images that cannot be used


def propose(df: pd.DataFrame, images_root: Path, given: dict[str, str | None], *, min_groups_per_label: int = 3,
            manifest_dir: Path | None = None) -> Proposal:
    """Which column plays which role; `given` (role -> column, group may be None) wins over the guesses."""
    import difflib

    found = list(map(str, df.columns))
    for role, name in given.items():
        if name is not None and name not in found:
            close = difflib.get_close_matches(name, found, n=1, cutoff=0.5)
            raise UserError(f"--{role}-column {name!r} is not a column of the manifest"
                            + (f" (did you mean {close[0]!r}?)" if close else "")
                            + f"; its columns: {', '.join(found)}")
    taken: set[str] = set(v for v in given.values() if v)
    columns: dict[str, str | None] = {}
    why: dict[str, str] = {}
    others: dict[str, list[str]] = {}

    def choose(role: str, candidates: list[tuple[str, str]], hint: str) -> None:
        """candidates: (column, why) best first."""
        if role in given:
            columns[role], why[role] = given[role], "as given"
            return
        candidates = [c for c in candidates if c[0] not in taken]
        if not candidates:
            raise DataError(f"no column of the manifest looks like the {role} column ({hint}); the manifest's "
                            f"columns: {', '.join(found)}: name it with --{role}-column")
        columns[role], why[role] = candidates[0]
        others[role] = [c for c, _ in candidates[1:4]]
        taken.add(candidates[0][0])

    values = {c: df[c].astype(str) for c in found}
    n = len(df)
    if n == 0:
        raise DataError("the manifest has no rows: nothing to propose columns from")
    image_share = {c: v.str.lower().str.strip().str.endswith(IMAGE_EXTENSIONS).mean() for c, v in values.items()}
    choose("image", [(c, f"{image_share[c]:.0%} of its values name image files")
                     for c in sorted(found, key=lambda c: -image_share[c]) if image_share[c] >= 0.5],
           "paths ending in .png, .jpg, ...")
    words = {c: v.str.split().str.len().mean() for c, v in values.items()}
    unique = [c for c in found if values[c].nunique() == n and (values[c].str.strip() != "").all()]
    ids = sorted((c for c in unique if c not in taken), key=lambda c: (not ID_NAMES.search(c), words[c] > 1,
                                                                       found.index(c)))
    choose("id", [(c, "a distinct value in every row") for c in ids], "a distinct, non-empty value in every row")
    distinct = {c: values[c].nunique() / n for c in found}
    texts = sorted((c for c in found if c not in taken and (words[c] > 1 and distinct[c] > 0.05 or distinct[c] > 0.5)),
                   key=lambda c: -words[c] * distinct[c])  # many words, and many different texts
    choose("text", [(c, f"{words[c]:.1f} words per value, {values[c].nunique()} distinct") for c in texts],
           "words: names, captions, descriptions")
    counts = {c: values[c].value_counts() for c in found}
    labels = [c for c in found if c not in taken and 2 <= len(counts[c]) <= max(2, n // 3)
              and counts[c].min() >= 2]
    labels.sort(key=lambda c: (not LABEL_NAMES.search(c), found.index(c)))
    choose("label", [(c, _classes(counts[c])) for c in labels],
           "a few values, each shared by several rows")
    label = columns["label"]
    if "group" in given:
        columns["group"], why["group"] = given["group"], "as given" if given["group"] else "none, as given"
    else:
        groups = [c for c in found if c not in taken and len(counts[c]) < n and len(counts[c]) > len(counts[label])
                  and (df.groupby(c)[label].nunique() == 1).all()]
        groups.sort(key=lambda c: (not GROUP_NAMES.search(c), -len(counts[c])))
        if groups:
            columns["group"] = groups[0]
            why["group"] = (f"{len(counts[groups[0]])} groups, each of one {label}: rows of a group stay in one split "
                            "(--group-column none: each item its own group)")
            others["group"] = groups[1:4]
        else:
            columns["group"] = None
            why["group"] = (f"no column groups rows of one {label}: each item is its own group "
                            "(--group-column COLUMN sets one)")
    rare = [str(v) for v, k in (df.groupby(label)[columns["group"]].nunique() if columns["group"]
                                else counts[label]).items() if k < min_groups_per_label]
    if rare:
        why["label"] += (f"; {len(rare)} with fewer than split.min_groups_per_label={min_groups_per_label} groups "
                         f"({', '.join(rare[:5])}) will be dropped by prepare")
    proposal = Proposal(rows=n, columns=columns, why=why, others={k: v for k, v in others.items() if v})
    proposal.image_notes = check_sample(df[columns["image"]].astype(str).tolist(), images_root, columns["image"],
                                        also=[manifest_dir] if manifest_dir else [])
    return proposal


def _classes(counts: pd.Series) -> str:
    shown = ", ".join(f"{v} {k}" for v, k in counts.head(4).items()) + (", ..." if len(counts) > 4 else "")
    return f"{len(counts)} classes ({shown})"


def check_sample(paths: list[str], images_root: Path, column: str, *, also: list[Path] = ()) -> list[str]:
    """Decode up to SAMPLE images spread over the manifest. None of them found: a wrong images root, an error that
    says so (and where they are, when they are relative to another folder). Some unusable: what is wrong with
    them, to report (prepare names every one)."""
    from fusionops.validation import check_image

    root = Path(images_root)
    if not root.is_dir():
        raise UserError(f"--images-root {root} is not a folder: give the folder the {column!r} paths are relative to")
    picked = [p for p in paths if p.strip()][:: max(1, len(paths) // SAMPLE)][:SAMPLE]
    problems = [(p, found) for p in picked if (found := check_image(root, p))]
    missing = [p for p, (problem, _) in problems if "not found" in problem]
    if picked and len(missing) == len(picked):
        near = next((f for f in (*also, root.parent, *root.iterdir()) if f.is_dir() and (f / picked[0]).is_file()),
                    None)
        hint = f" (they are under {near}: --images-root {near})" if near else ""
        raise DataError(f"none of {len(picked)} sampled image paths of column {column!r} is a file under {root} "
                        f"(e.g. {picked[0]!r} -> {root / picked[0]}){hint}: give --images-root the folder they are "
                        "relative to")
    return [f"{p!r}: {problem} -> {fix}" for p, (problem, fix) in problems]


def settings(proposal: Proposal, manifest: Path, images_root: Path, root: Path, model_name: str) -> dict[str, object]:
    """The params.yaml keys init writes (paths relative to the project folder when inside it)."""
    def where(path: Path) -> str:
        path = Path(path).resolve()
        return path.relative_to(root).as_posix() if path.is_relative_to(root) else str(path)

    values: dict[str, object] = {"data.manifest": where(manifest), "data.images_root": where(images_root)}
    values |= {KEYS[role]: proposal.columns[role] for role in ROLES}
    values["registry.model_name"] = model_name
    return values


# --- editing params.yaml in place ------------------------------------------------------------------------------

_KEY_LINE = re.compile(r"^(?P<indent> *)(?P<key>[A-Za-z_][\w-]*):(?P<rest>.*)$")


def _scalar(value: object) -> str:
    """A value as YAML writes it on one line: null, numbers and plain strings bare, anything else double-quoted."""
    if value is None:
        return "null"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_scalar(v) for v in value) + "]"
    if isinstance(value, bool | int | float):
        return json.dumps(value)
    text = str(value)
    plain = re.fullmatch(r"[A-Za-z0-9_./~-][\w./~ -]*", text) and not text.endswith(" ")
    return text if plain and yaml.safe_load(text) == text else json.dumps(text)


def _split_comment(rest: str) -> tuple[str, str]:
    """(value, comment with its leading spaces) of what follows `key:` on a line; a # inside quotes is no comment."""
    quote = None
    for i, ch in enumerate(rest):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or rest[i - 1] in " \t"):
            value = rest[:i].rstrip()
            return value, rest[len(value):]
    return rest.rstrip(), ""


def set_params(text: str, values: dict[str, object]) -> str:
    """params.yaml's `text` with each dotted key (`data.label_column`) set to its value. Only those lines change:
    every comment stays, aligned where it was; a key the file lacks is added at the end of its section (a section
    it lacks, at the end of the file). The result is read back to check that nothing else changed."""
    lines = text.splitlines()
    todo = dict(values)
    stack: list[tuple[int, str]] = []
    ends: dict[str, int] = {}  # section path -> index of its last line (for keys to add)
    for i, line in enumerate(lines):
        match = _KEY_LINE.match(line)
        if not match or line.lstrip().startswith("#"):
            continue
        indent, key, rest = len(match["indent"]), match["key"], match["rest"]
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = ".".join([k for _, k in stack] + [key])
        for depth in range(len(stack)):
            ends[".".join(k for _, k in stack[: depth + 1])] = i
        value, comment = _split_comment(rest)
        if path in todo:
            if not value:
                raise UserError(f"params.yaml: {path} holds a section, not a value: set it by hand")
            head = f"{match['indent']}{key}: {_scalar(todo.pop(path))}"
            column = len(line) - len(comment.lstrip()) if comment else 0
            pad = " " * max(column - len(head), 1) if comment else ""
            lines[i] = head + pad + comment.lstrip()
        if not value:
            stack.append((indent, key))
    for path, value in todo.items():  # keys the file does not have yet
        section, _, key = path.rpartition(".")
        if section in ends:
            depth = section.count(".") + 1
            at = ends[section]
            lines.insert(at + 1, f"{'  ' * depth}{key}: {_scalar(value)}")
            ends = {s: e + 1 if e > at or (e == at and f"{section}.".startswith(f"{s}.")) else e
                    for s, e in ends.items()}
        else:
            lines += ["", *(f"{'  ' * d}{part}:" for d, part in enumerate(section.split("."))),
                      f"{'  ' * (section.count('.') + 1)}{key}: {_scalar(value)}"]
    edited = "\n".join(lines) + ("\n" if text.endswith("\n") or not text else "")
    _check_edit(text, edited, values)
    return edited


def _check_edit(before: str, after: str, values: dict[str, object]) -> None:
    """The edited file must read as the old one with exactly `values` set."""
    expected = yaml.safe_load(before) or {}
    for path, value in values.items():
        *sections, key = path.split(".")
        node = expected
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    if yaml.safe_load(after) != expected:
        keys = ", ".join(f"{k}: {_scalar(v)}" for k, v in values.items())
        raise UserError(f"params.yaml could not be edited safely (its layout is unusual): set by hand: {keys}")
