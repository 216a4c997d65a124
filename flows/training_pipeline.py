"""Prefect flow: reproduce the DVC stages, then register the model in MLflow and run the promotion gate.

DVC decides what runs (dvc.lock stays the single truth: after this flow `dvc status` is clean); Prefect adds the
orchestration around it: one task per stage with its logs, retries where a retry can help, a run report artifact.

    python flows/training_pipeline.py [--project-dir DIR]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact

os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when MLflow is imported: its INFO lines repeat ours

# DVC's advice for people at a terminal (git add ..., dvc push) is noise in a run log: the flow handles both.
_DVC_HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage",
              "Use `dvc push`")


def dvc_stages(project_dir: Path) -> list[str]:
    """The stage names in dvc.yaml's order: dvc.yaml stays the one list of stages."""
    import yaml

    return list(yaml.safe_load((project_dir / "dvc.yaml").read_text())["stages"])


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero; its output is in the message."""


def _stage_env() -> dict[str, str]:
    """The environment of the stage commands: this interpreter's bin first (fusionops, dvc) and offline settings."""
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for key, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DVC_NO_ANALYTICS": "1",
                       "DO_NOT_TRACK": "true", "MLFLOW_DISABLE_TELEMETRY": "true"}.items():
        env.setdefault(key, value)
    return env


def _retry_on_lock(task, task_run, state) -> bool:
    """Retry only when another `dvc repro` held the workspace lock; a failed stage fails the same way again."""
    try:
        state.result()
    except StageFailed as err:
        return "Unable to acquire lock" in str(err)
    except Exception:
        return False
    return False


@task(retries=3, retry_delay_seconds=[5, 15, 30], retry_condition_fn=_retry_on_lock)
def run_stage(name: str, project_dir: Path) -> str:
    """`dvc repro <stage>`: DVC skips it when nothing it depends on changed."""
    logger = get_run_logger()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", name], cwd=project_dir, env=_stage_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    lines = []
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        if line.strip() and not any(hint in line for hint in _DVC_HINTS):
            logger.info(line)
    if proc.wait() != 0:
        raise StageFailed(f"stage {name} failed (exit {proc.returncode}):\n" + "\n".join(lines[-40:]))
    skipped = any("didn't change, skipping" in line for line in lines)
    return "skipped (up to date)" if skipped else "ran"


@task(retries=2, retry_delay_seconds=[5, 20])
def register(project_dir: Path) -> dict:
    """Log the run and register the model in MLflow; new version -> challenger (and champion if none yet)."""
    from fusionops.config import load_params
    from fusionops.registry import register_trained_model

    params = load_params(project_dir / "params.yaml")
    return register_trained_model(params, project_dir)


@task(retries=2, retry_delay_seconds=[5, 20])
def promote(project_dir: Path) -> dict:
    """The promotion gate: champion moves to the new version only if it is significantly better."""
    from fusionops.config import load_params
    from fusionops.registry import promote as run

    return run(load_params(project_dir / "params.yaml"))


def _report(project_dir: Path, metrics: dict, stages: dict[str, str], registered: dict, gate: dict) -> str:
    from fusionops.config import load_params
    from fusionops.lineage import data_version

    params = load_params(project_dir / "params.yaml")
    test, ablation = metrics["test"], metrics["ablation"]
    rows = [("fusion", test)] + [(k.replace("_", " "), v) for k, v in ablation.items()]
    table = "\n".join(f"| {name} | {m['accuracy']:.4f} | {m['macro_f1']:.4f} |" for name, m in rows)
    stage_lines = "\n".join(f"- {name}: {state}" for name, state in stages.items())
    markdown = f"""# training_pipeline

| model (test, n={test['items']}) | accuracy | macro-F1 |
|---|---|---|
{table}

Model: **{registered['name']}** version **{registered['version']}** ({_registered(registered, gate)}).
Promotion gate: {gate_line(gate, registered)}.
Data version (DVC): `{data_version(project_dir, params.data.images_root)}`; label column `{params.data.label_column}`.

Stages:
{stage_lines}
"""
    return markdown


def gate_line(gate: dict, registered: dict) -> str:
    """The gate's decision in one line: why, and who is champion now."""
    if registered["new"] and "champion" in registered["aliases"]:
        return f"nothing to compare: version {registered['version']} is the first, champion since its registration"
    if gate["decision"] == "unchanged":
        return f"unchanged: {gate['reason']}"
    return f"{gate['decision']}: {gate['reason']}; champion is version {gate['champion']}"


def _registered(reg: dict, gate: dict) -> str:
    """The version's aliases after the gate (registration made it challenger; the gate may have made it champion)."""
    if not reg["new"]:
        return "already registered: same weights"
    promoted = gate.get("decision") == "promoted" and str(gate.get("champion")) == str(reg["version"])
    return ", ".join(reg["aliases"] + (["champion"] if promoted and "champion" not in reg["aliases"] else []))


@flow(name="training_pipeline", log_prints=True)
def training_pipeline(project_dir: Path = Path(".")) -> dict:
    """prepare -> validate -> features -> train -> evaluate (DVC stages), then register and promote in MLflow."""
    import json

    from fusionops.config import load_params
    from fusionops.locks import project_lock

    project_dir = Path(project_dir).resolve()
    load_params(project_dir / "params.yaml")  # a mistake in params.yaml stops the run here, before any stage
    stages = {}
    with project_lock(project_dir):  # re-entrant: the retrain flow calls this one while holding it
        for name in dvc_stages(project_dir):
            stages[name] = run_stage.with_options(name=f"stage-{name}")(name, project_dir)
        registered = register(project_dir)
        gate = promote(project_dir)
        metrics = json.loads(load_params(project_dir / "params.yaml").evaluate.metrics.read_text())
    markdown = _report(project_dir, metrics, stages, registered, gate)
    create_markdown_artifact(markdown, key="training-report", description="metrics, registered version, gate, data")
    test = metrics["test"]
    get_run_logger().info("test accuracy %.4f, macro-F1 %.4f; models:/%s/%s (%s); gate %s", test["accuracy"],
                          test["macro_f1"], registered["name"], registered["version"],
                          _registered(registered, gate), gate_line(gate, registered))
    return {"metrics": metrics, "registered": registered, "promotion": gate, "stages": stages}


def _summary(project_dir: Path, result: dict) -> str:
    from fusionops.config import load_params
    from fusionops.registry import tracking_uri

    params = load_params(project_dir / "params.yaml")
    test, reg = result["metrics"]["test"], result["registered"]
    uri = tracking_uri(params)

    def rel(path: Path) -> str:  # as typed from where the flow was started
        return os.path.relpath(path)

    mlflow_bin = rel(Path(sys.executable).parent / "mlflow")
    ui = uri if uri.startswith("http") else f"{mlflow_bin} ui --backend-store-uri {uri} --port 5000"
    return "\n".join([
        "",
        "fusionops training_pipeline: done",
        f"  test accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} "
        f"({test['items']} test items, label '{params.data.label_column}')",
        f"  model         models:/{reg['name']}/{reg['version']} ({_registered(reg, result['promotion'])})",
        f"  gate          {gate_line(result['promotion'], reg)}",
        f"  reports       {rel(params.evaluate.metrics)}, {rel(params.evaluate.per_class)}, "
        f"{rel(params.validate_.report)}",
        f"  plots         {rel(params.evaluate.confusion_matrix)}, {rel(params.train.history)} (dvc plots show)",
        f"  MLflow UI     {ui}",
        "",
    ])


def parse_project_dir(parser: argparse.ArgumentParser) -> Path:
    """--project-dir from the command line; by default the project this folder is in: the nearest folder holding a
    params.yaml, here or above (as `fusionops` commands find it)."""
    from fusionops.config import find_params

    parser.add_argument("--project-dir", type=Path, default=None,
                        help="folder with dvc.yaml and params.yaml [default: the nearest with a params.yaml, here or "
                             "above]")
    given = parser.parse_args().project_dir
    return given if given is not None else find_params().absolute().parent  # a linked params.yaml: the link's folder


def check_project(project_dir: Path) -> None:
    """Before a flow runs or is served from the command line: a missing params.yaml or a mistake in it is one
    message and the exit."""
    from fusionops.config import load_params
    from fusionops.errors import UserError

    if not (project_dir / "params.yaml").is_file():
        print(f"error: no params.yaml in {project_dir.resolve()}: run inside the project folder or give --project-dir",
              file=sys.stderr)
        sys.exit(1)
    try:
        load_params(project_dir / "params.yaml")
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(err.exit_code)


def run_from_terminal(flow_fn, project_dir: Path) -> dict:
    """Run a flow from the command line (`check_project` first); a failed stage (exit 1) or a user error (its exit
    code) ends the run with its message (Prefect's log above has the details)."""
    from fusionops.errors import UserError

    check_project(project_dir)
    try:
        return flow_fn(project_dir=project_dir)
    except (UserError, StageFailed) as err:
        print(f"\nerror: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 1))


if __name__ == "__main__":
    project = parse_project_dir(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    print(_summary(project.resolve(), run_from_terminal(training_pipeline, project)))
