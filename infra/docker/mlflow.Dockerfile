# MLflow's image with the drivers its server needs here: Postgres (backend store) and S3 (artifacts).
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
RUN pip install --no-cache-dir psycopg2-binary boto3
