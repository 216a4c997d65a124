"""The model MLflow loads (models-from-code): a DataFrame of images + texts in, labels and probabilities out.

MLflow runs this file when the model is loaded; fusionops itself never imports it. Weights are read from
safetensors by the Predictor, so loading the model unpickles nothing.
"""

import base64
import binascii

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel

COLUMNS = {"image", "image_bytes", "text"}


class FusionModel(PythonModel):
    def load_context(self, context):
        from fusionops.predict import Predictor

        config = context.model_config or {}
        self.predictor = Predictor(context.artifacts["model"], quantize=bool(config.get("quantize", False)))
        self.aliases = dict(config.get("columns") or {})  # the training manifest's names: {"file": "image", ...}

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Each row: `text`, and the image as `image` (a file path) or `image_bytes` (the file's bytes, or base64
        text as in a JSON request). Either modality may be missing (null or empty): the row is classified from the
        other one. A request the model cannot use is refused with MLflow's invalid-parameter error (HTTP 400 when
        served), naming the rows."""
        from mlflow.exceptions import MlflowException

        from fusionops.errors import UserError

        aliases = {theirs: ours for theirs, ours in getattr(self, "aliases", {}).items()
                   if theirs in model_input.columns and ours not in model_input.columns}
        model_input = model_input.rename(columns=aliases)
        if not COLUMNS & set(model_input.columns):
            accepted = ", ".join(sorted(COLUMNS | set(getattr(self, "aliases", {}))))
            raise MlflowException.invalid_parameter_value(
                f"the request has none of the columns {accepted} (columns the model's signature does not name are "
                "dropped): send each row as {\"image\" or \"image_bytes\", \"text\"}")
        images, texts, not_base64 = [], [], []
        for i, row in enumerate(model_input.to_dict("records")):
            data, path, text = row.get("image_bytes"), row.get("image"), row.get("text")
            if isinstance(data, str) and data.strip():
                # The signature's image_bytes is a string: MLflow hands base64 text over as it is, so a null
                # beside rows with bytes is simply a row without an image (MLflow's own binary decoding refuses it).
                try:
                    data = base64.b64decode("".join(data.split()), validate=True)
                except (binascii.Error, ValueError):
                    not_base64.append(i)
            if isinstance(data, bytes | bytearray) and len(data):
                images.append(bytes(data))
            elif isinstance(path, str) and path.strip():
                images.append(path)
            else:
                images.append(None)
            texts.append(text if isinstance(text, str) else None)
        if not_base64:
            raise MlflowException.invalid_parameter_value(
                f"image_bytes is not base64 text (rows {', '.join(map(str, not_base64[:20]))}): send each file's "
                "bytes base64-encoded, or its path as image")
        progress = bool((params or {}).get("progress", False))
        try:
            return self.predictor.predict(images, texts, progress=progress)
        except UserError as err:
            raise MlflowException.invalid_parameter_value(str(err)) from None


mlflow.models.set_model(FusionModel())
