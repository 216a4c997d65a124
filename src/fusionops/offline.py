"""The offline environment: no telemetry lookups, no model hub downloads. Defined here once.

Every entry point applies it before the libraries that read it are imported: the `fusionops` console script, the
flows in flows/ (before Prefect is imported: it reads its analytics setting then), the stages DVC runs (they are
`fusionops` commands) and the tests. The Makefile exports the same values, read from this file. A value already
set in the environment wins: `HF_HUB_OFFLINE=0 fusionops ...` still reaches the hub.
"""

from __future__ import annotations

import os

OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",                        # transformers / huggingface_hub: never look a model up
    "TRANSFORMERS_OFFLINE": "1",
    "DO_NOT_TRACK": "true",                       # MLflow (and others) read it only as "true"
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DVC_NO_ANALYTICS": "1",
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",  # else the server logs "Failed to send telemetry" offline
}


def use_offline_env() -> None:
    """Set every value of OFFLINE_ENV that the environment does not set already."""
    for key, value in OFFLINE_ENV.items():
        os.environ.setdefault(key, value)
