# The models-from-code file of an mg-ray MLflow model (see mg_ray/serving/pyfunc.py).
from mlflow.models import set_model

from mg_ray.serving.pyfunc import MicroGestureClassifier

set_model(MicroGestureClassifier())
