"""fusionops: train, evaluate, register and retrain image+text classifiers."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("fusionops")
except PackageNotFoundError:  # the copy bundled inside a logged MLflow model is not pip-installed
    __version__ = "unknown"
