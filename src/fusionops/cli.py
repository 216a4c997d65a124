"""`fusionops <stage>`: one command per pipeline stage (each dvc.yaml stage runs one), plus register and predict.

Heavy libraries are imported inside the commands, so `fusionops --help` answers at once.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.logging import RichHandler
from rich.markup import escape

from fusionops.config import Params, load_params
from fusionops.errors import DataError, UserError

app = typer.Typer(
    help="Train, evaluate, register and serve image+text classifiers.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out = Console(soft_wrap=True)
err = Console(stderr=True)

ParamsOption = Annotated[Path, typer.Option("--params", "-p", help="params.yaml to read (paths are relative to it)")]


@app.callback()
def _setup(verbose: Annotated[bool, typer.Option("--verbose", "-v", help="debug logging")] = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(message)s",
                        handlers=[RichHandler(console=err, show_path=False, show_time=False)])
    for noisy in ("great_expectations", "urllib3", "httpx", "alembic", "mlflow", "matplotlib", "PIL"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def _rel(path: Path) -> str:
    """A path as a person would type it from here."""
    path = Path(path)
    return str(path.relative_to(Path.cwd())) if path.is_relative_to(Path.cwd()) else str(path)


def _prepared(params: Params):
    from fusionops.data.manifest import read_manifest

    if not Path(params.data.prepared).is_file():
        raise UserError(f"{params.data.prepared} not found: run `fusionops prepare` first")
    return read_manifest(params.data.prepared)


@app.command()
def prepare(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Read the raw manifest, add the stable grouped train/val/test split, write the prepared manifest."""
    from fusionops.data.prepare import prepare as run

    params = load_params(params_path)
    df = run(params.data, params.split)
    counts = df["split"].value_counts().reindex(["train", "val", "test"], fill_value=0)
    out.print(f"prepared {len(df)} items, {df['label'].nunique()} labels "
              f"(train {counts['train']}, val {counts['val']}, test {counts['test']}) -> {_rel(params.data.prepared)}")


@app.command()
def validate(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Check the prepared manifest (Great Expectations suite) and every image; exit 2 naming each bad row."""
    from fusionops.validation import validate as run
    from fusionops.validation import write_report

    params = load_params(params_path)
    report = run(_prepared(params), params.data.images_root,
                 min_train_items_per_label=params.validate_.min_train_items_per_label)
    write_report(report, params.validate_.report)
    if not report.success:
        raise DataError(f"{report.summary()}\nfull report: {params.validate_.report}")
    out.print(report.summary())


@app.command()
def features(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Image and text vectors for every prepared item; only content not in the cache is computed."""
    from fusionops.features import extract_features

    params = load_params(params_path)
    stats = extract_features(_prepared(params), params.data.images_root, params.features)
    for kind in ("image", "text"):
        s = stats[kind]
        out.print(f"{kind}: {s['items']} items, {s['computed']} computed, {s['cached']} from cache "
                  f"({s['seconds']} s, {stats['device']}, {stats['precision']})")


@app.command()
def train(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Train the fusion head (and the one-modality ablation heads) on the cached vectors."""
    from fusionops.features import load_features
    from fusionops.train import train as run

    params = load_params(params_path)
    summary = run(_prepared(params), load_features(params.features.out_dir), params.train)
    for variant, best in summary.items():
        out.print(f"{variant}: best epoch {best['epoch']}, val macro-F1 {best['val_macro_f1']:.4f}")


@app.command()
def evaluate(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Test-set metrics, the ablation, per-class table and confusion matrix."""
    from fusionops.evaluate import evaluate as run
    from fusionops.features import load_features

    params = load_params(params_path)
    metrics = run(_prepared(params), load_features(params.features.out_dir), params.train, params.evaluate)
    t, ab = metrics["test"], metrics["ablation"]
    out.print(f"test accuracy {t['accuracy']:.4f}, macro-F1 {t['macro_f1']:.4f} (n={t['items']}); "
              f"image only {ab['image_only']['accuracy']:.4f}, text only {ab['text_only']['accuracy']:.4f}")


@app.command()
def register(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Log the run to MLflow and register the model (alias challenger; champion when there is none)."""
    from fusionops.registry import register_trained_model

    params = load_params(params_path)
    result = register_trained_model(params, Path(params_path).resolve().parent)
    out.print(f"registered {result['name']} version {result['version']} ({', '.join(result['aliases'])}), "
              f"run {result['run_id']}")


@app.command()
def promote(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Move alias champion to the challenger if it is significantly better on the frozen test set."""
    from fusionops.registry import promote as run

    params = load_params(params_path)
    result = run(params)
    out.print(f"{result['name']}: {result['decision']} (champion is version {result['champion']}): {result['reason']}")
    if "gate" in result:
        out.print(f"report: {_rel(params.promote.report)}")


@app.command()
def rollback(params_path: ParamsOption = Path("params.yaml")) -> None:
    """Move alias champion back to the previous champion."""
    from fusionops.registry import rollback as run

    result = run(load_params(params_path))
    out.print(f"{result['name']}: {result['reason']}")


@app.command()
def predict(
    model: Annotated[str, typer.Option(help="MLflow model URI, e.g. models:/fusionops-emoji@champion")],
    manifest: Annotated[Path, typer.Option(help="CSV or Parquet with id, image path and text columns")],
    images_root: Annotated[Path, typer.Option(help="folder the manifest's image paths are relative to")],
    out_path: Annotated[Path, typer.Option("--out", help="CSV to write: item_id,prediction,confidence")],
    params_path: Annotated[Path | None, typer.Option(
        "--params", "-p", help="params.yaml for column names and the tracking URI [default: ./params.yaml if any]",
    )] = None,
) -> None:
    """Predict every row of a manifest with a registered model."""
    import pandas as pd

    from fusionops.atomic import atomic_path
    from fusionops.data.manifest import read_manifest, to_canonical
    from fusionops.registry import load_pyfunc
    from fusionops.validation import check_images

    if params_path is None:
        params = load_params("params.yaml") if Path("params.yaml").is_file() else Params()
    else:
        params = load_params(params_path)
    items = to_canonical(read_manifest(manifest), params.data, source=manifest, labelled=False)
    problems = check_images(items, images_root)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems)
        raise DataError(f"{len(problems)} image(s) cannot be used; nothing was written:\n{lines}")
    root = images_root.resolve()
    frame = pd.DataFrame({"image": [str(root / p) for p in items["image"]], "text": items["text"]})
    result = load_pyfunc(model, params).predict(frame, params={"progress": True})
    with atomic_path(out_path) as tmp:
        pd.DataFrame({"item_id": items["item_id"], "prediction": result["label"],
                      "confidence": result["confidence"].round(4)}).to_csv(tmp, index=False)
    out.print(f"predicted {len(items)} items with {model} -> {out_path}")


def main() -> None:
    """Console entry point: a user error is a message and an exit code, never a traceback."""
    try:
        app()
    except UserError as e:
        err.print(f"[bold red]error:[/] {escape(str(e))}", highlight=False)
        sys.exit(e.exit_code)
