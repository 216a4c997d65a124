"""The model MLflow loads (models-from-code): a DataFrame of images + texts in, labels and probabilities out.

MLflow runs this file when the model is loaded; fusionops itself never imports it. Weights are read from
safetensors by the Predictor, so loading the model unpickles nothing.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class FusionModel(PythonModel):
    def load_context(self, context):
        from fusionops.predict import Predictor

        config = context.model_config or {}
        self.predictor = Predictor(context.artifacts["model"], quantize=bool(config.get("quantize", False)))

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """Each row: `text`, and the image as `image` (a file path) or `image_bytes` (the file's bytes)."""
        from fusionops.errors import DataError

        images = []
        for i, row in enumerate(model_input.to_dict("records")):
            data, path = row.get("image_bytes"), row.get("image")
            if isinstance(data, bytes | bytearray) and len(data):
                images.append(bytes(data))
            elif isinstance(path, str) and path:
                images.append(path)
            else:
                raise DataError(f"row {i}: give the image as `image` (a path) or `image_bytes` (the file's bytes)")
        progress = bool((params or {}).get("progress", False))
        return self.predictor.predict(images, model_input["text"].tolist(), progress=progress)


mlflow.models.set_model(FusionModel())
