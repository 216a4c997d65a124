"""Prefect flow: what runs every night. New labelled batches in, a new data version, maybe a new champion out.

1. picks up new batches from retrain.inbox (one folder each: a manifest + its images);
2. validates each on its own (batch mode); a bad batch goes to retrain.quarantine with its report;
3. appends the good ones to the raw data and versions it with DVC (`dvc add`, `dvc push` with a remote);
4. measures drift of the new items against the training data (labels, text length, images, embeddings);
5. runs training_pipeline when retrain.min_new_items / retrain.drift_policy say so, and the gate decides;
6. with no new data, records that and trains nothing.

    python flows/retrain.py [--project-dir DIR]        # once, now
    python flows/deploy.py                             # on schedule.cron, as a deployment
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))  # run as a script or by a deployment's runner
# First: it sets the offline environment before Prefect is imported.
from training_pipeline import command_line, gate_line, run_from_terminal, say_once, training_pipeline  # noqa: I001
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact


def _params(project_dir: Path):
    from fusionops.config import load_params

    return load_params(project_dir / "params.yaml")


@task
def find_batches(project_dir: Path) -> list:
    from fusionops.ingest import find_batches as find

    return find(_params(project_dir).retrain.inbox)


@task
def check_batches(project_dir: Path, batches: list) -> tuple[list, list]:
    """Batch-mode validation of each batch on its own; bad ones are quarantined with their report."""
    from fusionops.ingest import check_batches as check
    from fusionops.ingest import quarantine

    params = _params(project_dir)
    good, bad = check(batches, params)
    quarantined = []
    for batch, report in bad:
        folder = quarantine(batch, report, params.retrain.quarantine)
        get_run_logger().warning("batch %s quarantined in %s: %d problem(s): %s%s", batch.name, folder,
                                 len(report.problems), "; ".join(str(p) for p in report.problems[:5]),
                                 "; ..." if len(report.problems) > 5 else "")
        quarantined.append({"batch": batch.name, "folder": str(folder), "problem_count": len(report.problems),
                            "problems": [str(p) for p in report.problems[:20]]})
    return good, quarantined


@task
def measure_drift(project_dir: Path, batches: list) -> dict | None:
    """New items against the training items. Their vectors go through the feature cache, so the features stage
    of the training run that may follow computes nothing again. Drift informs the decision; it never blocks the
    ingest: a failure here is logged and the batches are added all the same."""
    import pandas as pd

    from fusionops.data.manifest import read_manifest, to_canonical
    from fusionops.drift import drift_report
    from fusionops.features import extract_features, load_features

    params = _params(project_dir)
    if not (Path(params.features.out_dir) / "meta.json").is_file() or not Path(params.data.prepared).is_file():
        return None  # nothing trained yet: there is no reference to compare with
    try:
        prepared = read_manifest(params.data.prepared)
        reference = load_features(params.features.out_dir)
        if reference.item_ids != prepared["item_id"].tolist():
            get_run_logger().warning("features do not match the prepared manifest (a run in between?): no drift")
            return None
        train = (prepared["split"] == "train").to_numpy()
        new = pd.concat([to_canonical(b.rows, params.data, source=b.manifest).assign(
            image=lambda df, b=b: [str(b.folder / p) for p in df["image"]]) for b in batches], ignore_index=True)
        with tempfile.TemporaryDirectory() as tmp:
            settings = params.features.model_copy(update={"out_dir": Path(tmp) / "features"})
            extract_features(new, Path("/"), settings)
            new_features = load_features(Path(tmp) / "features")
        return drift_report(prepared[train].reset_index(drop=True), reference.select(train),
                            params.data.images_root, new, new_features, Path("/"), params.retrain.drift,
                            separator=params.data.separator)
    except Exception as err:  # noqa: BLE001 - see the docstring: drift must not stop good data from coming in
        get_run_logger().error("drift could not be measured (%s: %s): ingesting without it", type(err).__name__, err)
        return None


@task
def add_batches(project_dir: Path, batches: list) -> dict:
    """Append to the raw data, archive the batches, `dvc add` (and `dvc push` when a remote is configured).
    Runs even with no good batch: a data version an interrupted run left unrecorded is recorded now."""
    from fusionops.ingest import add_batches as add

    return add(batches, _params(project_dir), project_dir)


def _markdown(result: dict) -> str:
    lines = [f"# retrain: {result['decision']}", "", result["reason"] + ".", "",
             f"Items added and not trained on yet (before this run's training): {result['pending']}.", ""]
    if result["appended"]:
        lines += ["| batch | rows added |", "|---|---|"]
        lines += [f"| {name} | {rows} |" for name, rows in result["appended"].items()] + [""]
    for q in result["quarantined"]:
        lines += [f"**Quarantined** `{q['batch']}` ({q['problem_count']} problem(s)) in `{q['folder']}`:", ""]
        lines += [f"- {p}" for p in q["problems"]] + [""]
    drift = result.get("drift")
    if drift:
        lines += [f"Drift: **{'yes' if drift['drift'] else 'no'}** ({drift['new_items']} new vs "
                  f"{drift['reference_items']} training items; each test at p < {drift['threshold']:.4f})", "",
                  "| test | statistic | p-value | drift |", "|---|---|---|---|"]
        lines += [f"| {name} ({t['test']}) | {t['statistic']} | {t['p_value']:.4g} | {'yes' if t['drift'] else 'no'} |"
                  for name, t in drift["tests"].items()] + [""]
    lines.append(f"Data version (DVC): `{result['data_version']}`.")
    training = result.get("training")
    if training:
        gate, test = training["promotion"], training["metrics"]["test"]
        lines += ["", f"Trained: test accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f}; "
                      f"model version {training['registered']['version']}; gate: "
                      f"{gate_line(gate, training['registered'])}."]
    return "\n".join(lines) + "\n"


@flow(name="retrain", log_prints=True)
def retrain(project_dir: Path = Path(".")) -> dict:
    """Ingest new batches, version the data, check drift, retrain when params say so, let the gate decide."""
    from fusionops.drift import retrain_decision
    from fusionops.features.distributed import check_scheduler
    from fusionops.ingest import pending_items
    from fusionops.lineage import data_version
    from fusionops.locks import project_lock

    say_once()
    project_dir = Path(project_dir).resolve()
    params = _params(project_dir)
    result = {"appended": {}, "quarantined": [], "drift": None, "training": None}
    # The whole run under the project lock: no ingest or pipeline run can slip in between adding data and
    # training on it (training_pipeline takes the same lock again, re-entrantly).
    with project_lock(project_dir):
        batches = find_batches(project_dir)
        if batches:
            check_scheduler(params.features)  # new items need vectors: with Dask away, stop before changing anything
            good, result["quarantined"] = check_batches(project_dir, batches)
            if good:
                result["drift"] = measure_drift(project_dir, good)
            result["appended"] = add_batches(project_dir, good)["appended"]
        # Everything added and not trained on yet counts, whichever night it came in.
        pending = pending_items(params, project_dir) if Path(params.data.manifest).is_file() else 0
        drift = result["drift"]["drift"] if result["drift"] else None
        retrain_now, reason = retrain_decision(pending, drift, params.retrain)
        if not batches and not pending:
            reason = f"no new batch in {params.retrain.inbox} and nothing pending: nothing to train"
        elif batches and not result["appended"] and not pending:
            reason = f"every batch was quarantined: {reason}"
        result.update(pending=pending, decision="retrained" if retrain_now else "not retrained", reason=reason)
        if retrain_now:
            result["training"] = training_pipeline(project_dir=project_dir)
        result["data_version"] = data_version(project_dir, params.data.images_root, used=False)
    create_markdown_artifact(_markdown(result), key="retrain-report",
                             description="batches, quarantine, drift, data version, training and gate")
    print(_summary(result))
    return result


def _summary(result: dict) -> str:
    """A few lines for the run's log and the terminal; the markdown artifact has the details."""
    lines = [f"retrain: {result['decision']} ({result['reason']})"]
    lines += [f"  added {name}: {rows} rows" for name, rows in result["appended"].items()]
    lines += [f"  quarantined {q['batch']}: {q['problem_count']} problem(s), see {q['folder']}/validation.json"
              for q in result["quarantined"]]
    if drift := result.get("drift"):
        drifted = [name for name, t in drift["tests"].items() if t["drift"]]
        lines.append(f"  drift: {'yes (' + ', '.join(drifted) + ')' if drifted else 'no'}, {drift['new_items']} new "
                     f"vs {drift['reference_items']} training items")
    if training := result.get("training"):
        gate, test = training["promotion"], training["metrics"]["test"]
        lines.append(f"  trained version {training['registered']['version']}: test accuracy {test['accuracy']:.4f}, "
                     f"macro-F1 {test['macro_f1']:.4f}; gate {gate_line(gate, training['registered'])}")
    lines.append(f"  data version: {result['data_version']}")
    return "\n".join(lines)


if __name__ == "__main__":
    command_line(lambda project: run_from_terminal(retrain, project), __doc__, "python flows/retrain.py")
