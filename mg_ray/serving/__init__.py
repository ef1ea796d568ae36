"""The MLflow pyfunc of an mg-ray model, logged as models-from-code (`classifier.py` is the code
file MLflow stores and runs at load; the class it names lives in `pyfunc.py`)."""
