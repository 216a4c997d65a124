"""Serve the retrain flow as a deployment on the schedule in params.yaml (schedule.cron, schedule.timezone).

    prefect server start                               # a real API server (schedules need one)
    PREFECT_API_URL=http://127.0.0.1:4200/api python flows/deploy.py [--project-dir DIR]

It keeps running: its runner starts a flow run at every cron tick (and for every `prefect deployment run
'retrain/nightly'`). Watch runs, logs and the retrain-report artifacts in the UI at http://127.0.0.1:4200.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
# First: it sets the offline environment before Prefect is imported.
from training_pipeline import check_project, command_line  # noqa: I001
from retrain import retrain
from prefect.schedules import Cron


def check_not_on_a_work_pool(name: str) -> None:
    """A deployment of this name on a work pool (`fusionops platform up` made it) is its workers' to run: serving it
    here would take it off the pool, and pause it when this process stops. Refuse, and say what to do instead."""
    from prefect.client.orchestration import get_client
    from prefect.exceptions import ObjectNotFound

    try:
        with get_client(sync_client=True) as client:
            deployment = client.read_deployment_by_name(f"retrain/{name}")
    except ObjectNotFound:  # not deployed yet: serving it is what this script is for
        return
    except Exception as err:  # noqa: BLE001 - unknown: serving could take it off a pool, so do not
        print(f"error: cannot tell whether retrain/{name} runs on a work pool ({type(err).__name__}: {err}): check "
              "PREFECT_API_URL and the server", file=sys.stderr)
        sys.exit(1)
    if deployment.work_pool_name:
        print(f"error: retrain/{name} runs on work pool {deployment.work_pool_name!r} of this Prefect server "
              f"(fusionops platform up): serving it here would take it off the pool and pause it when this stops. "
              f"Run it now with `prefect deployment run 'retrain/{name}'`, or serve on another Prefect server",
              file=sys.stderr)
        sys.exit(1)


def serve(project_dir: Path) -> None:
    from fusionops.config import load_params

    project_dir = project_dir.resolve()
    schedule = load_params(project_dir / "params.yaml").schedule
    check_not_on_a_work_pool(schedule.deployment)
    retrain.serve(
        name=schedule.deployment,
        schedule=Cron(schedule.cron, timezone=schedule.timezone),
        parameters={"project_dir": str(project_dir)},
        description=f"Nightly retraining of {project_dir}: ingest, version, drift, train, promote.",
        tags=["fusionops"],
    )


def _serve_checked(project_dir: Path) -> None:
    check_project(project_dir)
    serve(project_dir)


if __name__ == "__main__":
    command_line(_serve_checked, __doc__, "PREFECT_API_URL=http://127.0.0.1:4200/api python flows/deploy.py")
