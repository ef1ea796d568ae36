# The MLflow tracking server image used by mlflow.yaml: the official image plus the basic-auth
# extra, the PostgreSQL driver and the S3 client. Keep the MLflow version within pyproject's range.
#
#   docker build -f infra/k8s/mlflow.Dockerfile -t REGISTRY/mg-ray-mlflow:3.17.2 infra/k8s
FROM ghcr.io/mlflow/mlflow:v3.17.2
RUN pip install --no-cache-dir "mlflow[auth]==3.17.2" "psycopg2-binary>=2.9" "boto3>=1.34"
