"""Rebuild a registered model from its lineage, in a folder of its own, and check the weights are the same bytes.

A version records the git commit of the code, and its run logged the params.yaml and dvc.lock it was made with
(dvc.lock names the data version, its hash in the DVC cache). That is enough even for a model the nightly retrain
made on data added after the last commit: the folder gets the commit's code, the logged params.yaml and dvc.lock,
and the data version from the project's DVC cache (or its remote); `dvc repro` then runs every stage again.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from fusionops.config import Params, RemoteParams, load_params
from fusionops.errors import UserError
from fusionops.features.image import sha256_file
from fusionops.features.text import TUNED_WEIGHTS
from fusionops.models import TEXT_ENCODER_DIR, WEIGHTS_FILE
from fusionops.train import model_dir
from fusionops.versioning import configure_remote, dvc

log = logging.getLogger(__name__)


class NotReproduced(UserError):
    """The rebuild ran, and its weights are not the registered bytes."""

    exit_code = 3


def _git(*args: str, cwd: Path) -> str:
    result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    if result.returncode != 0:
        raise UserError(f"`git {' '.join(args)}` failed in {cwd}:\n{(result.stderr or result.stdout).strip()}")
    return result.stdout.strip()


def _data_entry(lock: Path, data_dir: str) -> dict:
    """The data folder's entry in a dvc.lock: the hash, size and file count the stages read."""
    for stage in ((yaml.safe_load(lock.read_text()) or {}).get("stages") or {}).values():
        for dep in stage.get("deps", []):
            if dep.get("path") == data_dir and dep.get("md5"):
                return {k: dep[k] for k in ("md5", "size", "nfiles", "hash") if k in dep}
    raise UserError(f"the logged dvc.lock has no entry for {data_dir}: the model's data version is not known")


def _pin_data(work: Path, data_dir: str, entry: dict) -> None:
    """Point the data folder's .dvc file at the version in `entry` (the one the model was trained on)."""
    dvc_file = work / f"{data_dir}.dvc"
    if not dvc_file.is_file():
        raise UserError(f"{data_dir}.dvc is not in the model's commit: its data was not versioned with DVC")
    spec = yaml.safe_load(dvc_file.read_text()) or {}
    name = Path(data_dir).name
    outs = [o for o in spec.get("outs", []) if o.get("path") != name]
    spec["outs"] = [{**entry, "path": name}, *outs]
    dvc_file.write_text(yaml.safe_dump(spec, sort_keys=False))


def _remote(work: Path, project: Path, logged: Params) -> str | None:
    """The DVC remote to pull from: the one the version's params name, else the project's default remote (set up
    after the commit, or by hand in .dvc/config.local), made the clone's default."""
    if logged.remote.url is not None:
        url = str(logged.remote.url)
        if "://" not in url and not Path(url).is_absolute():  # a folder named relative to the project, not the clone
            url = os.path.normpath(project / url)
        return configure_remote(work, logged.remote.model_copy(update={"url": url}))
    name = configure_remote(project, RemoteParams())  # only reads the project's default remote
    if name is None:
        return None
    url = dvc("config", f"remote.{name}.url", cwd=project).strip()  # a folder comes back as an absolute path
    dvc("remote", "add", "--local", "--default", "--force", name, url, cwd=work)
    return name


def _restore_data(work: Path, project: Path, logged: Params, data_dir: str, version: str, cache: str) -> None:
    """Check the data version out of the project's DVC cache, else pull it from the DVC remote."""
    try:
        dvc("checkout", f"{data_dir}.dvc", cwd=work)
        return
    except UserError as err:
        checkout = str(err).splitlines()[-1].strip()
    name = _remote(work, project, logged)
    where = f"nor on the DVC remote {name!r}" if name else "and no DVC remote is configured"
    where += f" (checkout: {checkout})"
    if name:
        log.info("data version %s is not in %s: pulling it from the DVC remote %s", version, cache, name)
        try:
            dvc("pull", f"{data_dir}.dvc", cwd=work)
            return
        except UserError as err:
            where += f" (pull: {str(err).splitlines()[-1].strip()})"
    raise UserError(f"data version {version} is not in the project's DVC cache ({cache}) {where}: the model cannot "
                    "be rebuilt without its data (was the cache garbage-collected, or the data never pushed?)")


def _share_feature_cache(project: Params, logged: Params, work: Path) -> None:
    """The feature cache is content-addressed and safe for concurrent writers: the rebuild reads the project's."""
    cache = Path(logged.features.cache_dir)
    source = Path(project.features.cache_dir)
    if cache.is_relative_to(work) and source.is_dir() and not cache.exists():
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.symlink_to(source.resolve(), target_is_directory=True)


def reproduce(model_uri: str, into: Path, params: Params, project: Path) -> dict:
    """Rebuild the registered version behind `model_uri` in the new folder `into` (a clone of the project's git
    repository) and compare its weights with the registered ones. `params`, `project`: the current project's.

    The stages run the commit's own code when the commit holds it (src/fusionops), else the installed fusionops;
    the installed libraries (torch, ...) are this environment's: those that differ from the versions registered
    with the model are named (a warning before the rebuild, and `library_changes` in the result: None when the
    versions registered with the model cannot be read).
    """
    from fusionops.registry import library_changes, model_lineage

    into = Path(into).resolve()
    if into.exists() and (not into.is_dir() or any(into.iterdir())):
        raise UserError(f"{into} exists and is not an empty folder: give a new folder for the rebuild")
    project = Path(project).resolve()
    if into.is_relative_to(project):
        raise UserError(f"{into} is inside the project: give a folder outside it (e.g. "
                        f"{os.path.relpath(project.parent / 'rebuild')}), where the "
                        "rebuild's own dvc.yaml and outputs cannot be taken for the project's")
    with tempfile.TemporaryDirectory() as tmp:
        lineage = model_lineage(model_uri, params, Path(tmp))
        label = f"{lineage['name']} version {lineage['version']}"
        commit = lineage["tags"].get("git_commit")
        if not commit:
            raise UserError(f"{label} records no git commit (it was trained outside a git repository): "
                            "its code cannot be checked out")
        top = Path(_git("rev-parse", "--show-toplevel", cwd=project)).resolve()
        if subprocess.run(["git", "cat-file", "-e", f"{commit}^{{commit}}"], cwd=top,
                          capture_output=True).returncode != 0:
            raise UserError(f"{label} was trained on commit {commit}, which this repository ({top}) does not have: "
                            "fetch it from the repository it was made in")
        created = not into.exists()

        def remove_half_built() -> None:  # nothing half-made is left: the same command can simply run again
            shutil.rmtree(into, ignore_errors=True)
            if not created:
                into.mkdir()

        try:
            work, logged, data = _prepare_folder(lineage, label, commit, project, top, into)
            _share_feature_cache(params, logged, work)
        except KeyboardInterrupt:
            remove_half_built()
            raise _interrupted(into) from None
        except BaseException:
            remove_half_built()
            raise
    code = _uncommitted_code(lineage["tags"])
    if code:
        log.warning("%s was trained with %s: the rebuild runs the code as committed", label, code)
    libraries = None if lineage["libraries"] is None else library_changes(lineage["libraries"])  # None: not known
    if libraries:
        log.warning("this environment's libraries differ from %s's: %s; the weights may differ", label,
                    ", ".join(libraries))
    # Every stage runs again: neither DVC's run cache nor an up-to-date output may stand in for the rebuild; and
    # nothing of it is saved in the project's DVC cache (--no-commit: no outputs, no run-cache entries).
    src = work / "src"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    if (src / "fusionops" / "__init__.py").is_file():
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(src), os.environ.get("PYTHONPATH")]))
    repro = [sys.executable, "-m", "dvc", "repro", "--force", "--no-run-cache", "--no-commit", "--quiet"]
    # Its own process group: on an interrupt, DVC and the stage it runs are stopped before the folder is removed.
    process = subprocess.Popen(repro, cwd=work, env=env, start_new_session=True)
    try:
        failed = process.wait() != 0
    except KeyboardInterrupt:
        _stop_group(process)
        remove_half_built()
        raise _interrupted(into) from None
    if failed:
        raise UserError(f"`dvc repro` failed in {work} (its output is above); the folder is left as it is, for a look")
    weights = model_dir(logged.train.out_dir) / WEIGHTS_FILE
    rebuilt, registered = sha256_file(weights), lineage["tags"].get("model_sha256")
    encoder = weights.parent / TEXT_ENCODER_DIR / TUNED_WEIGHTS  # a tuned text encoder: identical too
    if lineage["tags"].get("text_encoder_sha256") or encoder.is_file():
        rebuilt += "+" + (sha256_file(encoder) if encoder.is_file() else "none")
        registered = f"{registered}+{lineage['tags'].get('text_encoder_sha256', 'none')}"
    return {"name": lineage["name"], "version": lineage["version"], "folder": work, "git_commit": commit,
            "uncommitted_code": code, "library_changes": libraries, "data_version": data, "weights": weights,
            "sha256": rebuilt, "registered_sha256": registered, "identical": rebuilt == registered,
            "metrics": json.loads(Path(logged.evaluate.metrics).read_text()), "logged_metrics": lineage["metrics"]}


def _uncommitted_code(tags: dict) -> str | None:
    """The code changes the version was trained with that no commit holds, in words; for a version registered
    before fusionops recorded them, any uncommitted change (git_dirty), which may or may not have been code."""
    if tags.get("uncommitted_code"):
        return f"uncommitted code changes ({tags['uncommitted_code']})"
    if "uncommitted_code" not in tags and tags.get("git_dirty") == "true":
        return "uncommitted changes (which files was not recorded; code changes among them cannot be restored)"
    return None


def _interrupted(into: Path) -> UserError:
    error = UserError(f"interrupted: the half-built {into} was removed")
    error.exit_code = 130
    return error


def _stop_group(process: subprocess.Popen) -> None:
    """Interrupt a process group as Ctrl-C would, then kill whatever is still running after 30 s."""
    import signal

    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGINT)
    try:
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()


def _prepare_folder(lineage: dict, label: str, commit: str, project: Path, top: Path,
                    into: Path) -> tuple[Path, Params, str]:
    """The commit checked out, the logged params.yaml and dvc.lock in place, the data version restored."""
    _git("clone", "--quiet", "--no-checkout", str(top), str(into), cwd=top)
    _git("-c", "advice.detachedHead=false", "checkout", "--quiet", commit, cwd=into)
    work = into / project.relative_to(top)
    shutil.copyfile(lineage["params"], work / "params.yaml")  # as logged: what the stages ran with, committed or not
    shutil.copyfile(lineage["dvc_lock"], work / "dvc.lock")
    logged = load_params(work / "params.yaml")
    images_root = Path(os.path.normpath(logged.data.images_root))
    if not images_root.is_relative_to(work):
        raise UserError(f"{label} read its data from {images_root}, outside the project (an absolute or ../ path in "
                        "data.images_root): only data versioned with DVC inside the project can be restored")
    data_dir = images_root.relative_to(work).as_posix()
    entry = _data_entry(work / "dvc.lock", data_dir)
    tagged = lineage["tags"].get("data_version")
    if tagged and tagged != entry["md5"]:
        raise UserError(f"{label}: its data_version tag ({tagged}) is not the data its dvc.lock names ({entry['md5']})")
    _pin_data(work, data_dir, entry)
    cache = dvc("cache", "dir", cwd=project).strip()
    dvc("cache", "dir", "--local", cache, cwd=work)  # the data version is looked up in the project's DVC cache
    _restore_data(work, project, logged, data_dir, entry["md5"], cache)
    return work, logged, entry["md5"]
