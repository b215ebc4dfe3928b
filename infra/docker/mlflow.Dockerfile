# MLflow's image with what its server needs here: the Postgres driver (backend and user stores), S3
# (artifacts), and Flask-WTF (mlflow[auth]: the basic-auth app's CSRF protection).
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
RUN pip install --no-cache-dir psycopg2-binary boto3 "Flask-WTF<2"
