"""Backorder forecasting: which SKUs are about to go on backorder, how likely, and why."""

import warnings

__version__ = "0.1.0"

# Where PySpark is installed (the dev extra, for mlflow.pyfunc.spark_udf), pandera imports
# pandas-on-Spark, which warns that it does not yet support pandas 3. Nothing here uses
# pandas-on-Spark, and the warning would break one-line stderr.
warnings.filterwarnings("ignore", "PySpark does not yet fully support pandas", FutureWarning)
