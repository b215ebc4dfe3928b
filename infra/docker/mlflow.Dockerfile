# MLflow's image with what its server needs here: the Postgres driver (backend and user stores), S3
# (artifacts), Flask-WTF (mlflow[auth]: the basic-auth app's CSRF protection), and adapterflow's server
# app (--app-name adapterflow-auth: basic-auth plus MANAGE to move @production; tasks/auth_app.py).
# Build context: the repository root (infra/compose.yaml), filtered by mlflow.Dockerfile.dockerignore.
ARG MLFLOW_VERSION=3.17.2
FROM ghcr.io/mlflow/mlflow:v${MLFLOW_VERSION}
RUN pip install --no-cache-dir psycopg2-binary boto3 "Flask-WTF<2"
# The project without its dependencies, for its mlflow.app entry point: the server imports only
# adapterflow.tasks.auth_app, which needs mlflow alone and runs on the image's Python even where that is
# older than the project's floor (hence --ignore-requires-python).
COPY pyproject.toml README.md /src/adapterflow/
COPY adapterflow /src/adapterflow/adapterflow
COPY flows /src/adapterflow/flows
COPY tasks /src/adapterflow/tasks
COPY adapters /src/adapterflow/adapters
RUN pip install --no-cache-dir --no-deps --ignore-requires-python /src/adapterflow && rm -rf /src/adapterflow
