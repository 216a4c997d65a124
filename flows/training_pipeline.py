"""Prefect flow: reproduce the DVC stages, then register the model in MLflow and run the promotion gate.

DVC decides what runs (dvc.lock stays the single truth: after this flow `dvc status` is clean); Prefect adds the
orchestration around it: one task per stage with its logs, retries where a retry can help, a run report artifact.
A mistake of the user's (a UserError, a stage that says `error:`) is said once, without a traceback, and never
retried; the flow then fails with its exit code, as the `fusionops` command would.

    python flows/training_pipeline.py [--project-dir DIR]
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

from fusionops.offline import use_offline_env

use_offline_env()  # before Prefect is imported: it reads its analytics setting then (else "Failed to send telemetry")
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when MLflow is imported: its INFO lines repeat ours

import typer  # noqa: E402
from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.artifacts import create_markdown_artifact  # noqa: E402

from fusionops.errors import UserError  # noqa: E402

# DVC's advice for people at a terminal (git add ..., dvc push) is noise in a run log: the flow handles both.
_DVC_HINTS = ("To track the changes with git", "git add ", "To enable auto staging", "dvc config core.autostage",
              "Use `dvc push`")


def dvc_stages(project_dir: Path) -> list[str]:
    """The stage names in dvc.yaml's order: dvc.yaml stays the one list of stages."""
    import yaml

    return list(yaml.safe_load((project_dir / "dvc.yaml").read_text())["stages"])


class StageFailed(RuntimeError):
    """A DVC stage exited non-zero. The message is what it said was wrong (its command's `error:` lines, or DVC's
    own); `exit_code` is its command's, as `fusionops <stage>` run by hand would exit."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):  # Prefect may pickle the exception with the failed state: keep the exit code
        return type(self), (str(self), self.exit_code)


def _stage_env() -> dict[str, str]:
    """The environment of the stage commands: this interpreter's bin first (fusionops, dvc); offline (set above)."""
    return {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}


def _ours() -> set[str]:
    """The names of the errors that are a person's to fix: UserError and every kind of it, and StageFailed."""
    names, todo = {"StageFailed"}, [UserError]
    while todo:
        kind = todo.pop()
        names.add(kind.__name__)
        todo += kind.__subclasses__()
    return names


class SayOnce(logging.Filter):
    """A user's mistake is said once, as `error: <message>`, with no traceback: of Prefect's records of a UserError
    (or StageFailed) the first says it, the later ones (the flow's own, a parent flow's) are dropped, and "Finished in
    state Failed(...)" no longer repeats the message. Other errors are logged as Prefect logs them."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, UserError | StageFailed):
            if getattr(exc, "said", False):
                return False
            exc.said = True
            record.msg, record.args, record.exc_info, record.exc_text = "error: %s", (exc,), None, None
            record.levelno, record.levelname = logging.ERROR, "ERROR"
            return True
        message = record.getMessage()
        if message.startswith("Finished in state Failed(") and re.search(rf"\b({'|'.join(_ours())}): ", message):
            record.msg, record.args = "Finished in state Failed", ()
        return True


def say_once() -> None:
    """Put SayOnce on Prefect's run loggers (once per process)."""
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, SayOnce) for f in logger.filters):
            logger.addFilter(SayOnce())


say_once()


def _not_a_user_mistake(task, task_run, state) -> bool:
    """Retry what a retry can help (a tracking server that was slow, a lock); a UserError fails the same way again."""
    try:
        state.result()
    except UserError:
        return False
    except Exception:
        return True
    return False


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
    """`dvc repro <stage>`: DVC skips it when nothing it depends on changed. Its output goes to the run's log as it
    comes, but for what says why it failed: that is the StageFailed message, said once."""
    logger = get_run_logger()
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro", "--single-item", name], cwd=project_dir, env=_stage_env(),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
    )
    lines, error, dvc_errors = [], None, []  # error: the command's `error:` line and the lines after it
    for line in proc.stdout:
        line = line.rstrip()
        lines.append(line)
        if line.startswith("ERROR: "):  # DVC's: "failed to reproduce 'x': ... exited with 2", a lock, a missing dep
            dvc_errors.append(line[len("ERROR: "):])
        elif error is None and line.startswith("error: "):
            error = [line[len("error: "):]]
        elif error is not None:
            error.append(line)
        elif line.strip() and not any(hint in line for hint in _DVC_HINTS):
            logger.info(line)
    if proc.wait() != 0:
        code = next((int(m[1]) for e in dvc_errors if (m := re.search(r"exited with (\d+)", e))), 1)
        said = "\n".join(error).strip() if error else "; ".join(e for e in dvc_errors if "exited with" not in e)
        raise StageFailed(f"stage {name}: {said}" if said else f"stage {name} failed (exit {code}): its output is "
                          "above", exit_code=code)
    skipped = any("didn't change, skipping" in line for line in lines)
    return "skipped (up to date)" if skipped else "ran"


@task
def check_registry(project_dir: Path) -> None:
    """Before any stage runs: a registry.model_name whose versions predict another label column or mode is refused
    now, not after training (register checks the labels themselves again before it creates a version)."""
    from fusionops.config import load_params
    from fusionops.registry import check_compatible

    check_compatible(load_params(project_dir / "params.yaml"), project_dir)


@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=_not_a_user_mistake)
def register(project_dir: Path) -> dict:
    """Log the run and register the model in MLflow; new version -> challenger (and champion if none yet)."""
    from fusionops.config import load_params
    from fusionops.registry import register_trained_model

    params = load_params(project_dir / "params.yaml")
    return register_trained_model(params, project_dir)


@task(retries=2, retry_delay_seconds=[5, 20], retry_condition_fn=_not_a_user_mistake)
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

    say_once()  # also in a deployment's process, which imports this module its own way
    project_dir = Path(project_dir).resolve()
    load_params(project_dir / "params.yaml")  # a mistake in params.yaml stops the run here, before any stage
    stages = {}
    with project_lock(project_dir):  # re-entrant: the retrain flow calls this one while holding it
        check_registry(project_dir)
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
    from fusionops.evaluate import small_data_warnings
    from fusionops.registry import tracking_uri, ui_url

    params = load_params(project_dir / "params.yaml")
    test, reg = result["metrics"]["test"], result["registered"]
    uri = tracking_uri(params)

    def rel(path: Path) -> str:  # as typed from where the flow was started
        return os.path.relpath(path)

    mlflow_bin = rel(Path(sys.executable).parent / "mlflow")
    runs = ui_url(uri if uri.startswith("http") else "http://127.0.0.1:5000", reg.get("experiment_id"))
    ui = runs if uri.startswith("http") else f"{mlflow_bin} ui --backend-store-uri {uri} --port 5000, then {runs}"
    warnings = [f"  warning       {w}" for w in small_data_warnings(result["metrics"])]
    return "\n".join([
        "",
        "fusionops training_pipeline: done",
        f"  test accuracy {test['accuracy']:.4f}, macro-F1 {test['macro_f1']:.4f} "
        f"({test['items']} test items, label '{params.data.label_column}')",
        *warnings,
        f"  model         models:/{reg['name']}/{reg['version']} ({_registered(reg, result['promotion'])})",
        f"  gate          {gate_line(result['promotion'], reg)}",
        f"  reports       {rel(params.evaluate.metrics)}, {rel(params.evaluate.per_class)}, "
        f"{rel(params.validate_.report)}",
        f"  plots         {rel(params.evaluate.training_curves)}, {rel(params.evaluate.confusion_matrix)} "
        "(and `dvc plots show`)",
        f"  MLflow UI     {ui}",
        "",
    ])


def check_project(project_dir: Path) -> None:
    """Before a flow runs or is served from the command line: a missing params.yaml or a mistake in it is one
    message and the exit."""
    from fusionops.config import load_params

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
    """Run a flow from the command line (`check_project` first). A failed stage or a user error ends the run with
    its exit code; its message was said once in the run's log (SayOnce), or is said here when it was not."""
    check_project(project_dir)
    try:
        return flow_fn(project_dir=project_dir)
    except (UserError, StageFailed) as err:
        if not getattr(err, "said", False):
            print(f"error: {err}", file=sys.stderr)
        sys.exit(getattr(err, "exit_code", 1))


def command_line(run: Callable[[Path], None], doc: str, *examples: str) -> None:
    """`python flows/<flow>.py [--project-dir DIR]`, with a --help like `fusionops --help` (typer). `doc`: the
    module's docstring (its first line is the help); `run` gets the project folder."""
    from fusionops.cli import example
    from fusionops.config import find_params

    app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)

    @app.command(help=doc.split("\n\n")[0].replace("\n", " "), epilog=example(*examples))
    def main(project_dir: Annotated[Path | None, typer.Option(
            help="folder with dvc.yaml and params.yaml \\[default: the nearest with a params.yaml, here or above]",
            show_default=False)] = None) -> None:
        # by default the project this folder is in, as `fusionops` commands find it (a linked params.yaml: the link's
        # folder)
        run(project_dir if project_dir is not None else find_params().absolute().parent)

    app()


if __name__ == "__main__":
    command_line(lambda project: print(_summary(project.resolve(), run_from_terminal(training_pipeline, project))),
                 __doc__, "python flows/training_pipeline.py", "python flows/training_pipeline.py --project-dir "
                 "../my-project")
