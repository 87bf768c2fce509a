"""MLflow's model-from-code file: MLflow runs it to build the registered model at load time."""

import mlflow

from backorder.mlflow_model import BackorderModel

mlflow.models.set_model(BackorderModel())
