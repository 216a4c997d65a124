"""`fusionops <stage>`: one command per pipeline stage (each dvc.yaml stage runs one), plus register and predict.

Heavy libraries are imported inside the commands, so `fusionops --help` answers at once.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Annotated

import typer
import typer.core
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from fusionops.config import Params, find_params, load_params
from fusionops.errors import DataError, UserError
from fusionops.offline import use_offline_env


def example(*commands: str) -> str:
    """A command's help ends with an example of it (markup escaped: brackets are text)."""
    return "\n\n".join(f"[bold]Example:[/] {escape(command)}" for command in commands)


# Typer's rich help gives a flag a type column (`<bool>`) where click's gives none: a flag takes no value.
_display_type = typer.core.TyperOption.display_type_rich
typer.core.TyperOption.display_type_rich = lambda self, ctx: None if self.is_flag else _display_type(self, ctx)

app = typer.Typer(
    help="Train, evaluate, register and serve image+text classifiers.",
    epilog=example("fusionops init --manifest data/raw/manifest.csv --images-root data/raw   (your own data)",
                   "fusionops validate --manifest new.csv --images-root new_images/ --mode batch"),
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True, soft_wrap=True)

ParamsOption = Annotated[Path | None, typer.Option(
    "--params", "-p",
    help="params.yaml to read (paths are relative to it) \\[default: the nearest, in this folder or above]",
    show_default=False)]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    # Off a terminal (a DVC stage, a Prefect run's log) one line per record, never wrapped at 80 columns.
    handler = (RichHandler(console=err, show_path=False, show_time=False) if err.is_terminal
               else logging.StreamHandler(sys.stderr))
    handler.setFormatter(logging.Formatter("%(message)s" if err.is_terminal else "%(levelname)-8s %(message)s"))
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    for noisy in ("great_expectations", "urllib3", "httpx", "alembic", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    if not verbose:  # MLflow sets its loggers' level from this when imported; its INFO lines repeat what we say
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")


def _root(params_path: Path | None) -> Path:
    """The project folder: the one holding the params file that is read."""
    return Path(os.path.abspath(find_params(params_path))).parent  # a linked params.yaml: the link's folder


def _rel(path: Path) -> str:
    """A path as a person would type it from here."""
    path = Path(path)
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _prepared(params: Params):
    from fusionops.data.manifest import read_manifest

    if not Path(params.data.prepared).is_file():
        raise UserError(f"{params.data.prepared} not found: run `fusionops prepare` first")
    return read_manifest(params.data.prepared)


@app.command(epilog=example("fusionops init --manifest data/raw/manifest.csv --images-root data/raw",
                             "fusionops init --manifest data/raw/manifest.csv --images-root data/raw --label-column "
                             "colour --group-column none --dry-run"))
def init(
    manifest: Annotated[Path, typer.Option(help="your manifest (CSV or Parquet): one row per item")],
    images_root: Annotated[Path, typer.Option(help="the folder its image paths are relative to")],
    id_column: Annotated[str | None, typer.Option(help="the id column \\[default: proposed]",
                                                  show_default=False)] = None,
    image_column: Annotated[str | None, typer.Option(help="the image path column \\[default: proposed]",
                                                     show_default=False)] = None,
    text_column: Annotated[str | None, typer.Option(help="the text column \\[default: proposed]",
                                                    show_default=False)] = None,
    label_column: Annotated[str | None, typer.Option(help="the label column \\[default: proposed]",
                                                     show_default=False)] = None,
    group_column: Annotated[str | None, typer.Option(help="rows sharing its value stay in one split; none: each item "
                                                     "its own group \\[default: proposed]", show_default=False)] = None,
    model_name: Annotated[str | None, typer.Option(help="registry.model_name \\[default: the project folder's name]",
                                                   show_default=False)] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="say what would be written, write nothing")] = False,
    params_path: ParamsOption = None,
) -> None:
    """Point params.yaml at your own data: propose the id, image, text, label and group columns, check the images.

    Writes the data.* keys and registry.model_name into params.yaml, changing only those lines: comments stay.
    """
    from fusionops.config import name_from_folder
    from fusionops.data.manifest import read_manifest
    from fusionops.init import ROLES, propose, set_params, settings

    path = Path(os.path.abspath(find_params(params_path)))
    params, root = load_params(path), path.parent  # a params.yaml to edit, without a mistake in it
    given = {role: value for role, value in zip(ROLES, (id_column, image_column, text_column, label_column,
                                                         group_column), strict=True) if value is not None}
    if given.get("group", "").lower() in ("none", "null"):
        given["group"] = None
    df = read_manifest(manifest)
    proposal = propose(df, images_root, given, min_groups_per_label=params.split.min_groups_per_label,
                       manifest_dir=manifest.resolve().parent)
    name = model_name or name_from_folder(root)
    values = settings(proposal, manifest, images_root, root, name)
    # The metrics breakdown only by columns this manifest has (the demo's vendor rarely is one).
    values["evaluate.breakdown"] = [c for c in params.evaluate.breakdown if c in set(map(str, df.columns))]
    out.print(f"{escape(_rel(manifest))}: {proposal.rows} rows, columns {escape(', '.join(map(str, df.columns)))}",
              highlight=False)
    for role in ROLES:
        column = proposal.columns[role]
        others = proposal.others.get(role)
        also = f"; also possible: {', '.join(others)} (--{role}-column)" if others else ""
        out.print(f"  {role:6} {escape(str(column or 'none')):12} {escape(proposal.why[role] + also)}",
                  highlight=False)
    out.print(f"  {'model':6} {escape(name):12} registry.model_name, from the project folder's name", highlight=False)
    for note in proposal.image_notes:
        err.print(f"[yellow]warning:[/] sampled image {escape(note)}", highlight=False)
    written = ", ".join(values)
    if dry_run:
        out.print(f"dry run: would write {written} into {escape(_rel(path))}; nothing written", highlight=False)
        return
    from fusionops.atomic import write_text

    write_text(path, set_params(path.read_text(encoding="utf-8"), values))
    load_params(path)  # what was written reads back as valid params
    out.print(f"wrote {written} into {escape(_rel(path))} (its other lines as they were)\nnext: dvc repro, then "
              "python flows/training_pipeline.py (register and promote)", highlight=False)


@app.command(epilog=example("fusionops prepare   (the prepare stage of dvc.yaml: run by `dvc repro`)"))
def prepare(params_path: ParamsOption = None) -> None:
    """Check every row of the raw manifest, add the stable grouped split, write the prepared manifest."""
    from fusionops.data.prepare import prepare as run

    params = load_params(params_path)
    df, rejected = run(params.data, params.split, params.validate_)
    counts = df["split"].value_counts().reindex(["train", "val", "test"], fill_value=0)
    for problem in rejected:
        err.print(f"skipped {problem}", highlight=False, markup=False)
    from fusionops.labels import explode

    out.print(f"prepared {len(df)} items, {explode(df, params.data.separator)['label'].nunique()} labels "
              f"(train {counts['train']}, val {counts['val']}, test {counts['test']}) -> {_rel(params.data.prepared)}"
              + (f"; {len(rejected)} problem(s) skipped, see {_rel(params.validate_.rejected)}" if rejected else ""))


@app.command(epilog=example("fusionops validate --manifest new.csv --images-root new_images/ --mode batch "
                             "--report check.json"))
def validate(
    manifest: Annotated[Path | None, typer.Option(
        help="a manifest to check (CSV or Parquet) \\[default: the prepared manifest, as the pipeline stage]")] = None,
    images_root: Annotated[Path | None, typer.Option(help="folder the manifest's image paths are relative to")] = None,
    mode: Annotated[str, typer.Option(
        help="dataset: a whole training set (splits, enough items per label); "
             "batch: new data for the current dataset (its labels only, new ids, no minimum count)")] = "dataset",
    report_path: Annotated[Path | None, typer.Option(
        "--report", help="where to write the JSON report \\[default: validate.report for the stage]")] = None,
    params_path: ParamsOption = None,
) -> None:
    """Check a manifest and every image; exit 2 with one line per problem (row, column, fix)."""
    from fusionops.data.manifest import read_manifest, to_canonical
    from fusionops.validation import validate as run
    from fusionops.validation import write_report

    if mode not in ("dataset", "batch"):
        raise UserError(f"--mode must be 'dataset' or 'batch', not {mode!r}")
    params = load_params(params_path)
    if manifest is None:  # the pipeline stage: the prepared manifest, as a dataset
        if mode != "dataset":
            raise UserError("--mode batch checks new data: give it with --manifest and --images-root")
        if images_root is not None:
            raise UserError("--images-root goes with --manifest (the manifest its image paths belong to); without "
                            "--manifest the prepared manifest is checked against data.images_root")
        df, root, report_path = _prepared(params), params.data.images_root, report_path or params.validate_.report
    else:
        if images_root is None:
            raise UserError("--manifest needs --images-root (the folder its image paths are relative to)")
        df, root = to_canonical(read_manifest(manifest), params.data, source=manifest), images_root
    known_labels, known_ids = _current_labels_and_ids(params) if mode == "batch" else (None, None)
    report = run(df, root, mode=mode, min_train_items_per_label=params.validate_.min_train_items_per_label,
                 known_labels=known_labels, known_ids=known_ids, max_pixels=params.validate_.max_image_pixels,
                 split=params.split if manifest is not None else None, separator=params.data.separator,
                 columns=params.data.columns)
    if report_path:
        write_report(report, report_path)
    if not report.success:
        rest = f"all in {_rel(report_path)}" if report_path else "give --report PATH to write them all"
        raise DataError(report.summary(limit=1000, rest=rest)
                        + (f"\nfull report: {_rel(report_path)}" if report_path else ""))
    out.print(report.summary())


def _current_labels_and_ids(params: Params) -> tuple[set[str], set[str]]:
    """The labels and ids of the current (raw) dataset: the labels a batch may use, the ids it may not."""
    from fusionops.ingest import current_dataset
    from fusionops.labels import known_labels

    if not Path(params.data.manifest).is_file():
        raise UserError(f"batch mode compares with the current dataset, but {params.data.manifest} does not exist")
    dataset = current_dataset(params)
    return known_labels(dataset, params.data.separator), set(dataset["item_id"].astype(str))


@app.command(epilog=example("fusionops features   (the features stage: `dvc repro -s features`)"))
def features(params_path: ParamsOption = None) -> None:
    """Image and text vectors for every prepared item; only content not in the cache is computed."""
    from fusionops.features import extract_features

    params = load_params(params_path)
    stats = extract_features(_prepared(params), params.data.images_root, params.features)
    for kind in ("image", "text"):
        s = stats[kind]
        out.print(f"{kind}: {s['items']} items, {s['computed']} computed, {s['cached']} from cache "
                  f"({s['seconds']} s, {stats['device']}, {stats['precision']})")


@app.command(epilog=example("fusionops train --restart   (or `dvc exp run -S train.lr=1e-3`)"))
def train(
    params_path: ParamsOption = None,
    resume: Annotated[bool, typer.Option(
        "--resume/--restart",
        help="continue a killed run from its checkpoint (saved every epoch), or discard the checkpoint and start over",
    )] = True,
) -> None:
    """Train the fusion head (and the one-modality ablation heads) on the cached vectors."""
    from fusionops.features import load_features
    from fusionops.train import train as run

    params = load_params(params_path)
    summary = run(_prepared(params), load_features(params.features.out_dir), params.train,
                  separator=params.data.separator, resume=resume, features_params=params.features)
    for variant, best in summary.items():
        out.print(f"{variant}: best epoch {best['epoch']}, val macro-F1 {best['val_macro_f1']:.4f}")


@app.command(epilog=example("fusionops evaluate   (then `dvc metrics show` and `dvc plots show`)"))
def evaluate(params_path: ParamsOption = None) -> None:
    """Test-set metrics, the ablation, missing modalities, calibration, timings, per-class table and plots."""
    from fusionops.evaluate import evaluate as run
    from fusionops.evaluate import small_data_warnings
    from fusionops.features import load_features
    from fusionops.reports import plot_training_curves, write_scores

    params = load_params(params_path)
    metrics = run(_prepared(params), load_features(params.features.out_dir), params.train, params.evaluate,
                  images_root=params.data.images_root, features_params=params.features)
    plot_training_curves(params.train.history, params.evaluate.training_curves)
    write_scores(metrics, params.evaluate.scores)
    t, ab = metrics["test"], metrics["ablation"]
    out.print(f"test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f} (n={t['items']}); "
              f"image only {ab['image_only']['accuracy']:.4f}, text only {ab['text_only']['accuracy']:.4f}")
    for warning in small_data_warnings(metrics):
        err.print(f"[yellow]warning:[/] {escape(warning)}", highlight=False)


@app.command(epilog=example("fusionops finetune --out weights/lite0-ft1.safetensors --epochs 20 --patience 5"))
def finetune(
    out_path: Annotated[Path, typer.Option("--out", help="the weights file to write (.safetensors, .pth or .pt)")],
    epochs: Annotated[int, typer.Option(min=1, help="at most this many epochs (early stopping)")] = 10,
    lr: Annotated[float, typer.Option(help="AdamW learning rate")] = 1e-4,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    patience: Annotated[int, typer.Option(min=1, help="epochs without a better val macro-F1 before stopping")] = 3,
    device: Annotated[str, typer.Option(help="auto | cpu | cuda")] = "auto",
    keep_gb: Annotated[float, typer.Option(min=0, help="memory for the frozen part's outputs: within it, the frozen "
                                           "part runs once and each epoch only the part that trains")] = 4.0,
    params_path: ParamsOption = None,
) -> None:
    """Fine-tune the image backbone's last stage on the train split (a GPU is recommended).

    Writes a state dict for features.image.weights, and beside it <out>.json, the report.

    With those weights the features stage computes new vectors under a new cache key space and keeps the old ones.
    """
    from fusionops.finetune import check_out_path, report_path
    from fusionops.finetune import finetune as run

    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, not {device!r}")
    check_out_path(out_path)
    params = load_params(params_path)
    r = run(_prepared(params), params.data.images_root, params.features.image, out=out_path, epochs=epochs, lr=lr,
            batch_size=batch_size, patience=patience, device=device, separator=params.data.separator, keep_gb=keep_gb)
    out.print(f"fine-tuned {', '.join(r['unfrozen'])} of {r['backbone']}: val macro-F1 {r['val_macro_f1_before']:.4f} "
              f"(linear probe, frozen) -> {r['val_macro_f1_after']:.4f} (best epoch {r['best_epoch']} of "
              f"{r['epochs']}; {r['seconds']:.0f} s on {r['device']}) -> {escape(_rel(out_path))}, "
              f"report {escape(_rel(report_path(out_path)))}", highlight=False)
    if r["val_macro_f1_after"] <= r["val_macro_f1_before"]:
        err.print("[yellow]note:[/] fine-tuning did not beat the frozen backbone on validation; the current "
                  "features.image.weights may be the better choice")
    root, weights = _root(params_path), out_path.resolve()
    setting = weights.relative_to(root) if weights.is_relative_to(root) else weights
    out.print(f"next: set `features.image.weights: {escape(str(setting))}` in params.yaml and run `dvc repro`; the "
              f"features stage computes vectors under encoder id {r['encoder_id']} (a new cache key space: the "
              "current vectors stay cached). DVC sees the path change, not the file: give each run a new file name.",
              highlight=False)


@app.command(epilog=example("fusionops register   (after `dvc repro`; the flow does it for you)"))
def register(params_path: ParamsOption = None) -> None:
    """Log the run to MLflow and register the model (alias challenger; champion when there is none)."""
    from fusionops.registry import register_trained_model

    params = load_params(params_path)
    result = register_trained_model(params, _root(params_path))
    if result["new"]:
        out.print(f"registered {result['name']} version {result['version']} ({', '.join(result['aliases'])}), "
                  f"run {result['run_id']}")
    else:
        out.print(f"not registered again: {result['name']} version {result['version']} already holds these weights "
                  f"(now {', '.join(result['aliases'])})")


@app.command(epilog=example("fusionops promote --dry-run"))
def promote(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="run the gate and say what it would do; move no alias, "
                                          "write no tag or report")] = False,
    params_path: ParamsOption = None,
) -> None:
    """Move alias champion to the challenger if it is significantly better on the frozen test set."""
    from fusionops.registry import promote as run

    params = load_params(params_path)
    result = run(params, dry_run=dry_run)
    champion = f"champion is version {result['champion']}" if result["champion"] else "no champion yet"
    out.print(f"{result['name']}: {'dry run: version ' + result['challenger'] + ' ' if dry_run else ''}"
              f"{result['decision']} ({champion}): {result['reason']}" + ("; nothing changed" if dry_run else ""))
    if "gate" in result and not dry_run:
        out.print(f"report: {_rel(params.promote.report)}")


@app.command(epilog=example("fusionops rollback --to 3"))
def rollback(
    to: Annotated[int | None, typer.Option("--to", min=1, metavar="VERSION", help="the version to make champion "
                                           "\\[default: the previous champion]", show_default=False)] = None,
    params_path: ParamsOption = None,
) -> None:
    """Move alias champion back to the previous champion (or --to VERSION), blocking the version rolled back from."""
    from fusionops.registry import rollback as run

    result = run(load_params(params_path), to=None if to is None else str(to))
    out.print(f"{result['name']}: {result['reason']}")


@app.command(epilog=example("fusionops reproduce models:/fusionops-emoji@champion --into ../rebuild"))
def reproduce(
    model: Annotated[str, typer.Argument(help="models:/NAME/VERSION or models:/NAME@ALIAS")],
    into: Annotated[Path, typer.Option("--into", help="a new folder for the rebuild (a clone of this repository)")],
    params_path: ParamsOption = None,
) -> None:
    """Rebuild a registered model from its lineage and check its weights are the registered bytes.

    The lineage: the git commit, the logged params.yaml and dvc.lock, and the data version.

    Exit 0 when the weights are the registered bytes, 3 when they differ, 1 when it cannot run.
    """
    from fusionops.reproduce import NotReproduced
    from fusionops.reproduce import reproduce as run

    params = load_params(params_path)
    result = run(model, into, params, _root(params_path))
    label = f"{result['name']} version {result['version']}"
    test, logged = result["metrics"].get("test", {}), result["logged_metrics"]
    scores = (f"test accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} (registered: "
              f"{logged.get('test.accuracy', float('nan')):.4f}, {logged.get('test.macro_f1', float('nan')):.4f})"
              if "accuracy" in test else "")
    code = result["uncommitted_code"]
    where = f"commit {result['git_commit'][:12]}, data {result['data_version']}"
    if result["identical"]:
        out.print(f"reproduced {label} in {_rel(result['folder'])} ({where}): weights identical, sha256 "
                  f"{result['sha256'][:16]}; {scores}", highlight=False)
        return
    dirty = f" It was trained with {code}." if code else ""
    changes = result["library_changes"]
    libraries = (" The library versions registered with the model could not be read (its requirements.txt): other "
                 "versions of torch, timm or transformers, or another machine, can change the bytes too."
                 if changes is None
                 else f" Libraries that differ from the registered ones: {', '.join(changes)}." if changes
                 else " The libraries are the registered versions; another machine (CPU kind, thread count, GPU) can "
                 "change the bytes too.")
    raise NotReproduced(f"rebuilt {label} in {_rel(result['folder'])} ({where}), but its weights differ: sha256 "
                        f"{result['sha256'][:16]}, registered {str(result['registered_sha256'])[:16]}; {scores}."
                        f"{dirty}{libraries}")


def _params_or_default(params_path: Path | None) -> Params:
    """--params when given, else the project's params.yaml (here or in a parent folder) when there is one, else the
    defaults."""
    found = find_params(params_path)
    return load_params(found) if params_path is not None or found.is_symlink() or found.exists() else Params()


def _unlabelled_items(manifest: Path, images_root: Path, params: Params):
    """The manifest's items and each one's absolute image path (None for an empty cell); every row that cannot be
    used (no image and no text, a missing or broken image) is named in one error, before anything is written."""
    from fusionops.data.manifest import read_manifest, to_canonical
    from fusionops.validation import Problem, check_images, in_their_names

    items = to_canonical(read_manifest(manifest), params.data, source=manifest, labelled=False)
    has_image = items["image"].astype(str).str.strip() != ""
    problems = [Problem(item_id, "image, text", "neither an image nor a text", "give at least one")
                for item_id in items.loc[~has_image & (items["text"].astype(str).str.strip() == ""), "item_id"]]
    repeated = items["item_id"][items["item_id"].duplicated()]
    problems += [Problem(str(item_id), "item_id", "id is not unique", "give every row its own id")
                 for item_id in repeated.unique()]
    problems = in_their_names(problems + check_images(items, images_root), params.data.columns)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise DataError(f"{len(problems)} row(s) cannot be used; nothing was written:\n{lines}")
    root = images_root.resolve()
    return items, [str(root / p) if ok else None for p, ok in zip(items["image"], has_image, strict=True)]


@app.command(epilog=example("fusionops predict --model models:/fusionops-emoji@champion --manifest new.csv "
                             "--images-root new_images/ --out predictions.csv"))
def predict(
    model: Annotated[str, typer.Option(
        help="an MLflow model URI (models:/fusionops-emoji@champion, runs:/...) or a model folder (models/fusion)")],
    manifest: Annotated[Path, typer.Option(help="CSV or Parquet with id, image path and text columns")],
    images_root: Annotated[Path, typer.Option(help="folder the manifest's image paths are relative to")],
    out_path: Annotated[Path, typer.Option(
        "--out", help="CSV (or .parquet) to write: the id column (data.id_column), prediction, confidence, "
                      "modalities")],
    params_path: Annotated[Path | None, typer.Option(
        "--params", "-p",
        help="params.yaml for column names and the tracking URI \\[default: the project's, here or above, if any]",
    )] = None,
) -> None:
    """Predict every row of a manifest with a registered model (or a trained model folder).

    A row with an empty image path or an empty text is classified from the other modality (column `modalities`).
    """
    import pandas as pd

    from fusionops.atomic import atomic_path
    from fusionops.explain import load_predictor

    params = _params_or_default(params_path)
    items, images = _unlabelled_items(manifest, images_root, params)
    texts = [t if str(t).strip() else None for t in items["text"]]
    result = load_predictor(model, params).predict(images, texts, progress=True)  # the model's own predictor
    table = pd.DataFrame({params.data.id_column: items["item_id"], "prediction": result["label"],
                          "confidence": result["confidence"].round(4), "modalities": result["modalities"]})
    with atomic_path(out_path) as tmp:
        if out_path.suffix.lower() in (".parquet", ".pq"):
            table.to_parquet(tmp, index=False)
        else:
            table.to_csv(tmp, index=False)
    out.print(f"predicted {len(items)} items with {model} -> {out_path}")


@app.command(epilog=example("fusionops explain --model models/fusion --image banana.png --text banana"))
def explain(
    model: Annotated[str, typer.Option(
        help="a model folder (e.g. models/fusion) or an MLflow model URI (models:/name@champion, runs:/...)")],
    image: Annotated[Path | None, typer.Option(help="one item: its image file")] = None,
    text: Annotated[str | None, typer.Option(help="one item: its text")] = None,
    manifest: Annotated[Path | None, typer.Option(
        help="many items: CSV or Parquet with id, image path and text columns")] = None,
    images_root: Annotated[Path | None, typer.Option(help="folder the manifest's image paths are relative to")] = None,
    out_path: Annotated[Path | None, typer.Option(
        "--out", help="JSON to write (a list, one explanation per item); needed with --manifest")] = None,
    top: Annotated[int, typer.Option(min=1, help="how many classes to show")] = 3,
    neighbours: Annotated[int, typer.Option(min=0, help="how many nearest training items to show")] = 5,
    params_path: Annotated[Path | None, typer.Option(
        "--params", "-p",
        help="params.yaml for column names and the tracking URI \\[default: the project's, here or above, if any]",
    )] = None,
) -> None:
    """Explain predictions: top classes, what each modality contributed, the nearest training items.

    One item with --image and/or --text (printed), or every row of --manifest (written to --out as JSON).
    """
    import json

    from fusionops.atomic import atomic_path
    from fusionops.explain import explain as run
    from fusionops.explain import load_predictor, summary
    from fusionops.validation import check_image

    params = _params_or_default(params_path)
    if manifest is not None:
        if image is not None or text is not None:
            raise UserError("give one item (--image / --text) or a --manifest, not both")
        missing = [flag for flag, value in (("--images-root", images_root), ("--out", out_path)) if value is None]
        if missing:
            raise UserError(f"--manifest needs {' and '.join(missing)} too (--images-root: the folder its image "
                            "paths are relative to; --out: the JSON file to write)")
        items, images = _unlabelled_items(manifest, images_root, params)
        texts, ids = items["text"].astype(str).tolist(), items["item_id"].astype(str).tolist()
    else:
        if image is None and not (text or "").strip():
            raise UserError("give --image and/or --text for one item, or --manifest, --images-root and --out")
        found = check_image(image.resolve().parent, image.name) if image is not None else None
        if found:
            unwritten = f"; {out_path} was not written" if out_path is not None else ""
            raise DataError(f"--image: {found[0]} -> {found[1]}{unwritten}")
        images, texts, ids = [image.resolve() if image is not None else None], [text], [None]
    predictor = load_predictor(model, params)
    results = run(predictor, images, texts, top=top, neighbours=neighbours, progress=manifest is not None)
    if manifest is None:
        # A table wraps at the console's width: 80 columns when the output is a file or a pipe, too few for paths
        (out if out.is_terminal else Console(width=200)).print(summary(results[0]))
    if out_path is not None:
        rows = [{"item_id": i, **r} for i, r in zip(ids, results, strict=True)] if manifest is not None else results
        with atomic_path(out_path) as tmp:
            tmp.write_text(json.dumps(rows, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        out.print(f"explained {len(results)} item(s) with {escape(model)} -> {escape(_rel(out_path))}")


@app.command(epilog=example("fusionops ingest data/inbox/2026-01-31"))
def ingest(
    path: Annotated[Path, typer.Argument(help="a batch folder (manifest + images), or an inbox of batch folders")],
    params_path: ParamsOption = None,
) -> None:
    """Check new labelled batches, append the good ones to the raw data and version it with DVC.

    A bad batch is moved to retrain.quarantine with its report, and nothing else changes.
    """
    from fusionops.ingest import add_batches, batch_in, check_batches, find_batches, quarantine
    from fusionops.locks import project_lock

    params = load_params(params_path)
    root = _root(params_path)
    path = path.resolve()
    if not path.is_dir():
        raise UserError(f"{path} {'is not a folder' if path.exists() else 'does not exist'}: give a batch folder "
                        "(a manifest.csv or .parquet and its images) or an inbox of batch folders")
    single = batch_in(path)
    batches = [single] if single else find_batches(path)
    if not batches:
        raise UserError(f"{path} holds no batch: a batch is a folder with a manifest.csv (or .parquet) and images")
    with project_lock(root):  # never beside a pipeline run or another ingest: the manifest has one writer
        good, bad = check_batches(batches, params)
        for batch, report in bad:
            where = quarantine(batch, report, params.retrain.quarantine)
            listed = report.summary(rest=f"all in {_rel(where / 'validation.json')}")
            err.print(f"batch {batch.name} quarantined in {_rel(where)}:\n{listed}\nfix it there, then "
                      f"`fusionops ingest {_rel(where)}`", markup=False)
        result = add_batches(good, params, root)
    for name, rows in result["appended"].items():
        out.print(f"batch {name}: {rows} rows appended to {_rel(params.data.manifest)}, images in "
                  f"{_rel(result['images'][name])}; the batch folder moved to {_rel(result['archived'][name])}",
                  markup=False)
    if result["appended"]:
        pushed = ", pushed to the DVC remote" if result["versioned"]["pushed"] else ""
        out.print(f"new data version in {result['versioned']['dvc_file']}{pushed}; train on it with `dvc repro` (then "
                  "`fusionops register` and `fusionops promote`) or the training_pipeline flow", markup=False)
    if bad:
        raise DataError(f"{len(bad)} of {len(batches)} batch(es) quarantined")


cache_app = typer.Typer(help="The content-addressed feature cache: what it holds, and pruning old key spaces.",
                        epilog=example("fusionops cache info"), no_args_is_help=True)
app.add_typer(cache_app, name="cache")


@cache_app.command("info", epilog=example("fusionops cache info"))
def cache_info(params_path: ParamsOption = None) -> None:
    """Size, entries and encoder id of every key space (* = used by the current params)."""
    from rich.table import Table

    from fusionops.features.cache import describe
    from fusionops.features.extract import current_key_spaces

    params = load_params(params_path)
    if not Path(params.features.cache_dir).is_dir():
        raise UserError(f"no feature cache at {_rel(params.features.cache_dir)} (features.cache_dir): it is made by "
                        "`fusionops features` (or `dvc repro`); check the path")
    spaces, current = describe(params.features.cache_dir), current_key_spaces(params.features)
    table = Table("", "key space (encoder id - precision)", "dim", "entries", "shards", "MB", "created")
    for s in spaces:
        table.add_row("*" if s["key_space"] in current else "", s["key_space"], str(s["dim"]), str(s["entries"]),
                      str(s["shards"]), f"{s['bytes'] / 1e6:.1f}", str(s["created"]))
    Console(width=160).print(table)
    total = sum(s["bytes"] for s in spaces) / 1e6
    out.print(f"{_rel(params.features.cache_dir)}: {len(spaces)} key space(s), "
              f"{sum(s['entries'] for s in spaces)} vectors, {total:.1f} MB")


@cache_app.command("prune", epilog=example("fusionops cache prune --dry-run"))
def cache_prune(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="list what would be removed, remove nothing")] = False,
    params_path: ParamsOption = None,
) -> None:
    """Remove the key spaces the current params do not use (another backbone, preprocessing or precision)."""
    from fusionops.features.cache import prune
    from fusionops.features.extract import current_key_spaces

    params = load_params(params_path)
    if not Path(params.features.cache_dir).is_dir():
        out.print(f"nothing to prune: no feature cache at {_rel(params.features.cache_dir)} (features.cache_dir)")
        return
    removed = prune(params.features.cache_dir, current_key_spaces(params.features), dry_run=dry_run)
    verb = "would remove" if dry_run else "removed"
    for r in removed:
        whole = f"{r['entries']} vectors, {r['bytes'] / 1e6:.1f} MB"
        what = whole if r["whole"] else f"{r['damaged']} damaged shard(s)"
        out.print(f"{verb} {r['key_space']} ({what})")
    if not removed:
        out.print("nothing to prune: every key space is in use")


@app.command(epilog=example("fusionops doctor"))
def doctor(params_path: ParamsOption = None) -> None:
    """Check this machine and project, and say what to fix.

    Packages, weights, encoders, folders, disk, GPU, MLflow, DVC, train.head and the manifest.
    """
    from rich.table import Table

    from fusionops.config import ParamsError
    from fusionops.doctor import Check, run_checks

    found, root = find_params(params_path), _root(params_path)
    if not (found.is_symlink() or found.exists()):
        load_params(found)  # outside a project: says so (nothing to check against)
    try:
        params, mistake = load_params(found), None
    except ParamsError as err:  # the machine is still checked, against the defaults
        params, mistake = Params().resolve_paths(root), err
    checks = run_checks(params, root)
    if mistake:
        checks.append(Check("params", False, str(mistake), "fix params.yaml (the checks above used the defaults)"))
    table = Table("check", "", "found", "to fix", show_lines=False)
    for c in checks:
        mark = "[red]FAIL[/]" if not (c.ok or c.warning) else "[yellow]note[/]" if c.warning else "[green]ok[/]"
        table.add_row(c.name, mark, escape(c.detail), escape(c.fix))
    Console(width=160).print(table)
    failed = [c.name for c in checks if not c.ok and not c.warning]
    if failed:
        raise UserError(f"{len(failed)} check(s) failed: {', '.join(failed)}")


platform_app = typer.Typer(help="The team platform on this machine: PostgreSQL, MLflow and Prefect servers, a worker.",
                           epilog=example("fusionops platform up"), no_args_is_help=True)
app.add_typer(platform_app, name="platform")
DirOption = Annotated[Path | None, typer.Option("--dir", envvar="FUSIONOPS_PLATFORM_DIR",
                                                help="platform folder \\[params: platform.dir]")]
PostgresPort = Annotated[int | None, typer.Option(envvar="FUSIONOPS_POSTGRES_PORT",
                                                 help="\\[params: platform.postgres_port]")]
MlflowPort = Annotated[int | None, typer.Option(envvar="FUSIONOPS_MLFLOW_PORT",
                                               help="\\[params: platform.mlflow_port]")]
PrefectPort = Annotated[int | None, typer.Option(envvar="FUSIONOPS_PREFECT_PORT",
                                                 help="\\[params: platform.prefect_port]")]


def _platform(params_path: Path | None, **overrides):
    from fusionops.platform import resolve

    params = _params_or_default(params_path)
    return resolve(params.platform, **overrides), params


@platform_app.command("up", epilog=example("fusionops platform up --mlflow-port 5001"))
def platform_up(
    params_path: ParamsOption = None,
    dir_: DirOption = None,
    postgres_port: PostgresPort = None,
    mlflow_port: MlflowPort = None,
    prefect_port: PrefectPort = None,
) -> None:
    """Start PostgreSQL, `mlflow server` and `prefect server` on it, a process worker; deploy prefect.yaml."""
    from fusionops.platform import up

    platform, params = _platform(params_path, dir=dir_, postgres_port=postgres_port, mlflow_port=mlflow_port,
                                 prefect_port=prefect_port)
    for service, state in up(platform, _root(params_path), params).items():
        out.print(f"{service:12} {escape(state)}")
    out.print("\nPoint the pipeline at it (every command, flow and test reads these):")
    for key, value in platform.env().items():
        out.print(f"  export {key}={value}")


@platform_app.command("status", epilog=example("fusionops platform status"))
def platform_status(params_path: ParamsOption = None, dir_: DirOption = None,
                    postgres_port: PostgresPort = None, mlflow_port: MlflowPort = None,
                    prefect_port: PrefectPort = None) -> None:
    """Each service, its URL, whether `up` started it and whether it answers; exit 1 when one does not.

    The deployments row answers when every deployment is on the worker's pool and none is paused.
    """
    from rich.table import Table

    from fusionops.platform import status

    platform, params = _platform(params_path, dir=dir_, postgres_port=postgres_port, mlflow_port=mlflow_port,
                                 prefect_port=prefect_port)
    table = Table("service", "url", "pid", "answers")
    services = status(platform, params.schedule.deployment)
    for s in services:
        table.add_row(s.name, s.url, str(s.pid or "-"), "[green]yes[/]" if s.answers else "[red]no[/]")
    Console(width=160).print(table)
    failing = [s for s in services if not s.answers]
    if failing:
        said = [s.name if s.name != "deployments" else f"deployments ({s.url})" for s in failing]
        raise UserError(f"not answering: {', '.join(said)} (`fusionops platform up` starts the services and deploys "
                        f"prefect.yaml again; logs in {platform.root / 'logs'})")


@platform_app.command("down", epilog=example("fusionops platform down"))
def platform_down(params_path: ParamsOption = None, dir_: DirOption = None) -> None:
    """Stop what `up` started (its pid files), newest first; the data stays for the next `up`."""
    from fusionops.platform import down

    platform, _ = _platform(params_path, dir=dir_)
    stopped = down(platform)
    out.print(f"stopped: {', '.join(stopped)}" if stopped else "nothing of ours was running")


@platform_app.command("env", epilog=example('eval "$(fusionops platform env)"'))
def platform_env(params_path: ParamsOption = None, dir_: DirOption = None,
                 postgres_port: PostgresPort = None, mlflow_port: MlflowPort = None,
                 prefect_port: PrefectPort = None) -> None:
    """Print the exports that point the pipeline at the platform: eval "$(fusionops platform env)".

    They are printed even when the platform is down (a note says so on stderr): they are where it will answer.
    """
    from fusionops.platform import silent_servers

    platform, _ = _platform(params_path, dir=dir_, postgres_port=postgres_port, mlflow_port=mlflow_port,
                            prefect_port=prefect_port)
    for key, value in platform.env().items():
        print(f"export {key}={value}")
    down = silent_servers(platform)
    if down:
        err.print(f"note: not answering now: {', '.join(down)} (`fusionops platform up` starts them)", markup=False,
                  highlight=False)


def main() -> None:
    """Console entry point: a user error is a message and an exit code, never a traceback."""
    use_offline_env()  # before any library that reads it is imported (the commands import them lazily)
    try:
        app()
    except UserError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)
