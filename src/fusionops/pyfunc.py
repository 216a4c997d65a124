"""The model MLflow loads (models-from-code): a DataFrame of image + text in, label + confidence out.

MLflow runs this file when the model is loaded; fusionops itself never imports it. Weights are read from
safetensors by the Predictor, so loading the model unpickles nothing.
"""

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class FusionModel(PythonModel):
    def load_context(self, context):
        from fusionops.predict import Predictor

        self.predictor = Predictor(context.artifacts["model"])

    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        """`image`: a file path (or the file's bytes), `text`: a string; one row per item."""
        return self.predictor.predict(model_input["image"].tolist(), model_input["text"].tolist())


mlflow.models.set_model(FusionModel())
