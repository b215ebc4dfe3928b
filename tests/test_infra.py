"""Shared servers (infra/): the compose file and the Kubernetes GPU work-pool template are checked
statically (no container engine or cluster here); the native scripts are run for real: Postgres,
SeaweedFS S3, an MLflow server and a Prefect server, both requiring a login, with the retrain flow
run against them as the trainer and promotions tried by the trainer and the promoter."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from conftest import ROOT, cls_config, free_ports, write_config

INFRA = ROOT / "infra"
NATIVE = INFRA / "native"
MODEL_NAME = "tiny-cls-adapter"
NO_POSTGRES = 3  # start.sh's exit status when the Postgres server binaries are missing


# ---- compose: parsed and its wiring checked -------------------------------------------------

REQUIRED = re.compile(r"\$\{(\w+):?\?[^}]*\}")  # ${VAR:?message}: compose refuses to start without VAR


def _interpolate(value):
    """Compose's ${VAR:-default} / ${VAR-default} with nothing set: the defaults; a required ${VAR:?...}: '<VAR>'."""
    if isinstance(value, str):
        value = REQUIRED.sub(lambda m: f"<{m.group(1)}>", value)
        return re.sub(r"\$\{(\w+)(?::?-([^}]*))?\}", lambda m: m.group(2) or "", value)
    if isinstance(value, dict):
        return {k: _interpolate(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v) for v in value]
    return value


@pytest.fixture(scope="module")
def compose() -> dict:
    return _interpolate(yaml.safe_load((INFRA / "compose.yaml").read_text()))


def _option(command: list[str], name: str) -> str:
    """The value of --name in a command given as a list (--name=value or --name value)."""
    for i, arg in enumerate(command):
        if arg == name:
            return command[i + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    raise AssertionError(f"{name} not in {command}")


def _url(text: str):
    from urllib.parse import urlsplit

    return urlsplit(text)


def test_compose_has_the_services_and_their_start_order(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "create-bucket", "create-auth-database", "mlflow", "prefect-server", "prefect-worker"}
    expected = {
        "create-bucket": {"minio": "service_healthy"},
        "create-auth-database": {"postgres": "service_healthy"},
        "mlflow": {"postgres": "service_healthy", "create-bucket": "service_completed_successfully",
                   "create-auth-database": "service_completed_successfully"},
        "prefect-server": {"postgres": "service_healthy"},
        "prefect-worker": {"prefect-server": "service_healthy", "mlflow": "service_healthy",
                           "create-bucket": "service_completed_successfully"},
    }
    for name, service in services.items():
        depends = {target: spec["condition"] for target, spec in service.get("depends_on", {}).items()}
        assert depends == expected.get(name, {}), name
        for target, condition in depends.items():
            if condition == "service_healthy":
                assert services[target]["healthcheck"]["test"], f"{name} waits for {target}'s health, which it lacks"
    for step in ("create-bucket", "create-auth-database"):
        assert services[step]["restart"] == "no"  # a one-shot step: 'completed successfully' must be reachable
    declared = set(compose["volumes"])
    for service in services.values():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared or (INFRA / source).exists(), volume


def test_compose_has_no_default_secrets_and_publishes_on_loopback_only():
    text = (INFRA / "compose.yaml").read_text()
    defaults = re.findall(r"\$\{(\w*(?:PASSWORD|SECRET|TOKEN|KEY)\w*):?-", text)
    assert not defaults, f"secrets with a default value: {defaults}"
    assert set(REQUIRED.findall(text)) == {"POSTGRES_PASSWORD", "MINIO_ROOT_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
                                           "MLFLOW_FLASK_SERVER_SECRET_KEY", "PREFECT_API_AUTH_STRING"}
    published = [port for service in yaml.safe_load(text)["services"].values() for port in service.get("ports", [])]
    assert published and all(str(port).startswith("127.0.0.1:") for port in published), published


def test_compose_servers_point_at_postgres_and_minio(compose):
    services = compose["services"]
    pg_env = services["postgres"]["environment"]
    init_sql = (INFRA / "postgres" / "init-databases.sql").read_text()
    assert "CREATE DATABASE mlflow" in init_sql and "CREATE DATABASE prefect" in init_sql
    assert any(v.startswith("./postgres/init-databases.sql:/docker-entrypoint-initdb.d/") for v in services["postgres"]["volumes"])

    minio_env = services["minio"]["environment"]
    s3_endpoint = "http://minio:9000"
    assert "127.0.0.1:9000:9000" in services["minio"]["ports"]
    bucket_cmd = services["create-bucket"]["command"]
    bucket = bucket_cmd[-1].split("/", 1)[1]
    assert bucket_cmd[:2] == ["mb", "--ignore-existing"]
    mc_host = _url(services["create-bucket"]["environment"]["MC_HOST_minio"])
    assert (mc_host.hostname, mc_host.port) == ("minio", 9000)
    assert (mc_host.username, mc_host.password) == (minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"])

    mlflow = services["mlflow"]
    backend = _url(_option(mlflow["command"], "--backend-store-uri"))
    assert (backend.scheme, backend.hostname, backend.port, backend.path) == ("postgresql", "postgres", 5432, "/mlflow")
    assert backend.username == pg_env["POSTGRES_USER"] and mlflow["environment"]["PGPASSWORD"] == pg_env["POSTGRES_PASSWORD"]
    assert _option(mlflow["command"], "--artifacts-destination") == f"s3://{bucket}/mlflow"
    assert "mlflow:5000" in _option(mlflow["command"], "--allowed-hosts").split(",")
    mlflow_port = _option(mlflow["command"], "--port")

    prefect = services["prefect-server"]
    database = _url(prefect["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"])
    assert (database.scheme, database.hostname, database.port, database.path) == ("postgresql+asyncpg", "postgres", 5432, "/prefect")
    assert (database.username, database.password) == (pg_env["POSTGRES_USER"], pg_env["POSTGRES_PASSWORD"])
    prefect_port = _option(prefect["command"], "--port")

    worker = services["prefect-worker"]
    env = worker["environment"]
    assert env["PREFECT_API_URL"] == f"http://prefect-server:{prefect_port}/api"
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{mlflow_port}"
    for client in (mlflow, worker):
        s3 = client["environment"]
        assert s3["AWS_ENDPOINT_URL"] == s3["MLFLOW_S3_ENDPOINT_URL"] == s3_endpoint
        assert (s3["AWS_ACCESS_KEY_ID"], s3["AWS_SECRET_ACCESS_KEY"]) == (minio_env["MINIO_ROOT_USER"], minio_env["MINIO_ROOT_PASSWORD"])
    pools = {d["work_pool"]["name"] for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert pools == {_option(worker["command"], "--pool")} and _option(worker["command"], "--type") == "process"


def test_compose_servers_require_a_login(compose):
    import configparser
    from importlib.metadata import entry_points

    services = compose["services"]
    pg_env = services["postgres"]["environment"]
    mlflow = services["mlflow"]
    # adapterflow-auth: basic-auth plus MANAGE to move @production (tasks/auth_app.py, tests/test_auth_app.py), an installed app
    assert _option(mlflow["command"], "--app-name") == "adapterflow-auth"
    assert any(e.name == "adapterflow-auth" for e in entry_points(group="mlflow.app"))
    env = mlflow["environment"]
    assert env["MLFLOW_AUTH_ADMIN_PASSWORD"] == "<MLFLOW_AUTH_ADMIN_PASSWORD>"  # required, no default
    assert env["MLFLOW_FLASK_SERVER_SECRET_KEY"] == "<MLFLOW_FLASK_SERVER_SECRET_KEY>"
    [mount] = [v for v in mlflow["volumes"] if v.split(":")[1] == env["MLFLOW_AUTH_CONFIG_PATH"]]
    ini = configparser.ConfigParser()
    ini.read(INFRA / mount.split(":")[0])
    auth = ini["mlflow"]
    assert "admin_password" not in auth and auth["default_permission"] == "READ" and auth["admin_username"] == "admin"
    users_db = _url(auth["database_uri"])
    assert (users_db.scheme, users_db.hostname, users_db.port, users_db.path) == ("postgresql", "postgres", 5432, "/mlflow_auth")
    assert users_db.username == pg_env["POSTGRES_USER"] and users_db.password is None  # libpq reads PGPASSWORD
    create = services["create-auth-database"]
    assert create["environment"]["PGPASSWORD"] == pg_env["POSTGRES_PASSWORD"] and "CREATE DATABASE mlflow_auth" in create["command"][0]
    dockerfile = INFRA / mlflow["build"]["context"] / mlflow["build"]["dockerfile"]
    assert "Flask-WTF" in dockerfile.read_text()  # mlflow[auth]: the app refuses to start without it

    server, worker = services["prefect-server"]["environment"], services["prefect-worker"]["environment"]
    assert server["PREFECT_SERVER_API_AUTH_STRING"] == worker["PREFECT_API_AUTH_STRING"] == "<PREFECT_API_AUTH_STRING>"
    # The worker runs flows as the trainer; its password comes from `adapterflow infra users`, never a default.
    assert worker["MLFLOW_TRACKING_USERNAME"] == "trainer"
    assert re.search(r"MLFLOW_TRACKING_PASSWORD: \$\{MLFLOW_TRAINER_PASSWORD\}\n", (INFRA / "compose.yaml").read_text())


def test_compose_builds_from_files_that_exist(compose):
    for name in ("mlflow", "prefect-worker"):
        build = compose["services"][name]["build"]
        context = (INFRA / build["context"]).resolve()
        dockerfile = context / build["dockerfile"]
        assert dockerfile.is_file(), dockerfile
        for line in dockerfile.read_text().splitlines():
            if line.startswith("COPY "):
                for source in line.split()[1:-1]:
                    assert (context / source).exists(), f"{dockerfile.name}: {line}"


# ---- Kubernetes GPU work-pool template -------------------------------------------------------

@pytest.fixture(scope="module")
def gpu_template() -> dict:
    return json.loads((INFRA / "k8s" / "gpu-job-template.json").read_text())


def test_gpu_template_variables_are_a_schema_with_every_placeholder(gpu_template):
    import jsonschema
    from prefect.server.schemas.actions import validate_base_job_template
    from prefect.utilities.templating import find_placeholders

    variables = gpu_template["variables"]
    jsonschema.Draft7Validator.check_schema(variables)
    defaults = {k: v["default"] for k, v in variables["properties"].items() if "default" in v}
    jsonschema.Draft7Validator(variables).validate(defaults)
    used = {p.name for p in find_placeholders(gpu_template["job_configuration"])}
    assert used == set(variables["properties"])  # none undeclared, none unused
    validate_base_job_template(gpu_template)  # what the Prefect server runs on `work-pool create`


def test_gpu_template_renders_a_job_that_requests_gpus(gpu_template):
    from prefect.utilities.templating import apply_values

    defaults = {k: v["default"] for k, v in gpu_template["variables"]["properties"].items() if "default" in v}
    job = apply_values(gpu_template["job_configuration"], defaults)["job_manifest"]
    assert job["kind"] == "Job" and job["spec"]["completions"] == 1
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert gpu_template["variables"]["properties"]["gpu_count"]["minimum"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory" and {"name": "dshm", "mountPath": "/dev/shm"} in container["volumeMounts"]


# ---- native services, for real --------------------------------------------------------------

PORT_VARIABLES = (
    "PG_PORT", "S3_PORT", "MLFLOW_PORT", "PREFECT_PORT", "WEED_MASTER_PORT", "WEED_VOLUME_PORT", "WEED_FILER_PORT",
    "WEED_MASTER_GRPC_PORT", "WEED_VOLUME_GRPC_PORT", "WEED_FILER_GRPC_PORT", "WEED_S3_GRPC_PORT",
)


def _read_env_file(path: Path) -> dict[str, str]:
    return dict(line.removeprefix("export ").split("=", 1) for line in path.read_text().splitlines() if line.startswith("export "))


def _started_pids(state: Path) -> set[int]:
    """Every process of the services: the sessions start.sh created, and the postmaster."""
    leaders = {int(p.read_text()) for p in (state / "run").glob("*.pid")}
    ps = subprocess.run(["ps", "-eo", "pid=,sid="], capture_output=True, text=True, check=True).stdout.split()
    members = {int(pid) for pid, sid in zip(ps[::2], ps[1::2]) if int(sid) in leaders}
    postmaster = state / "pg" / "data" / "postmaster.pid"
    return leaders | members | ({int(postmaster.read_text().split()[0])} if postmaster.exists() else set())


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


@pytest.fixture(scope="module")
def native_services():
    """One set of services for this module's tests (start.sh takes ~30 s); each test uses its own model and users."""
    # Not pytest's tmp_path: its root is private (0700), and as root Postgres runs as another user.
    state = Path(tempfile.mkdtemp(prefix="adapterflow-infra-"))
    state.chmod(0o755)
    env = dict(os.environ, **{f"ADAPTERFLOW_{name}": str(port) for name, port in zip(PORT_VARIABLES, free_ports(len(PORT_VARIABLES)))})
    pids: set[int] = set()
    try:
        started = subprocess.run([str(NATIVE / "start.sh"), str(state)], env=env, capture_output=True, text=True, timeout=480)
        if started.returncode == NO_POSTGRES:
            pytest.skip(started.stderr.strip().splitlines()[-1])
        assert started.returncode == 0, started.stderr[-4000:]
        pids = _started_pids(state)
        yield state, _read_env_file(state / "env.sh")
    finally:  # even when start-up or the test failed
        pids |= _started_pids(state) if (state / "run").is_dir() else set()
        stopped = subprocess.run([str(NATIVE / "stop.sh"), str(state)], capture_output=True, text=True, timeout=240)
        shutil.rmtree(state, ignore_errors=True)
    assert stopped.returncode == 0, stopped.stderr
    assert not [pid for pid in pids if _alive(pid)], "stop.sh left processes behind"


def _query(url: str, sql: str, *args) -> tuple:
    import psycopg2

    connection = psycopg2.connect(url)
    try:
        with connection.cursor() as cursor:
            cursor.execute(sql, args)
            return cursor.fetchone()
    finally:
        connection.close()


def _status(url: str, login: str | None = None) -> int:
    """The HTTP status of a GET, with HTTP basic credentials `user:password` when given."""
    import base64
    import urllib.error
    import urllib.request

    headers = {"Authorization": "Basic " + base64.b64encode(login.encode()).decode()} if login else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as err:
        return err.code


def _client_env(services: dict, home: Path, user: str | None = None, password: str | None = None) -> dict:
    """A client's environment: env.sh's variables and one MLflow identity (none: no MLflow login at all)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_TRACKING_", "PREFECT_API_"))}
    env.update(services, ADAPTERFLOW_HOME=str(home), OMP_NUM_THREADS="1")
    if user:
        env.update(MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD=password)
    return env


def _team(state: Path, services: dict, model: str, home: Path, out: Path, *names: str) -> dict[str, str]:
    """`adapterflow infra users` as the admin of these services; returns the new passwords by user name."""
    admin = _read_env_file(state / "admin.env")
    created = _adapterflow("infra", "users", model, "--out", str(out), *names,
                           env=_client_env(services, home, admin["MLFLOW_TRACKING_USERNAME"], admin["MLFLOW_TRACKING_PASSWORD"]))
    assert created.returncode == 0, created.stderr[-4000:]
    assert out.stat().st_mode & 0o777 == 0o600 and "PASSWORD=" not in created.stdout
    return dict(re.findall(r"MLFLOW_TRACKING_USERNAME=(\S+) MLFLOW_TRACKING_PASSWORD=(\S+)", out.read_text()))


def _adapterflow(*args: str, env: dict) -> subprocess.CompletedProcess:
    script = Path(sys.executable).parent / "adapterflow"
    command = [str(script)] if script.exists() else [sys.executable, "-m", "adapterflow.flows.cli"]
    return subprocess.run([*command, *args], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)


# Enough training for the first version to beat the bare base model at the promotion gate.
PROMOTABLE = {"train.max_steps": 20, "train.learning_rate": 0.02, "adapter.target_modules": ["query", "value", "dense"],
              "train.checkpoint_every": 100, "promotion": {"metric": "accuracy"}}


@pytest.mark.e2e
@pytest.mark.xdist_group("native-services")  # one worker, one start of the services (the module fixture) for both tests
@pytest.mark.timeout(900)  # with the services' start (module fixture) on 2 busy cores: ~6 min measured
def test_retrain_against_native_servers(native_services, tmp_path, tiny_bert, cls_data, monkeypatch):
    import boto3
    import mlflow
    from mlflow.tracking import MlflowClient

    from adapterflow.tasks.registry_tags import read_events

    state, services = native_services
    uri, bucket = services["MLFLOW_TRACKING_URI"], services["ADAPTERFLOW_S3_BUCKET"]
    home = tmp_path / "home"

    # Nobody gets in without a login: MLflow's API and Prefect's answer 401; /health stays open for probes.
    prefect_login = services["PREFECT_API_AUTH_STRING"]
    for url in (f"{uri}/api/2.0/mlflow/experiments/search?max_results=1", f"{services['PREFECT_API_URL']}/admin/version"):
        assert _status(url) == 401, url
    assert _status(f"{services['PREFECT_API_URL']}/admin/version", prefect_login) == 200
    assert _status(f"{uri}/health") == _status(f"{services['PREFECT_API_URL']}/health") == 200

    passwords = _team(state, services, MODEL_NAME, home, tmp_path / "users.txt")
    assert set(passwords) == {"trainer", "promoter"}
    trainer, promoter = (_client_env(services, home, user, passwords[user]) for user in ("trainer", "promoter"))
    admin = _read_env_file(state / "admin.env")  # this process reads the servers as the admin
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", admin["MLFLOW_TRACKING_USERNAME"])
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", admin["MLFLOW_TRACKING_PASSWORD"])
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)

    tracking = {"mlflow_uri": uri, "dvc_remote": services["ADAPTERFLOW_DVC_REMOTE"]}
    config = write_config(tmp_path / "run.yaml", cls_config(tiny_bert, cls_data, **{**PROMOTABLE, "tracking": tracking}))
    result = _adapterflow("run", str(config), env=trainer)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"registered       {MODEL_NAME} version 1  alias @staging" in result.stdout

    # MLflow: the run and the registered version, as the server (on Postgres) reports them.
    version = client.get_model_version_by_alias(MODEL_NAME, "staging")
    run = client.get_run(version.run_id)
    assert run.info.status == "FINISHED" and run.info.artifact_uri.startswith("mlflow-artifacts:")
    assert client.get_registered_model(MODEL_NAME).aliases == {"staging": version.version}
    database = services["ADAPTERFLOW_POSTGRES_URL"]
    assert _query(database + "/mlflow", "SELECT status FROM runs WHERE run_uuid = %s", run.info.run_id) == ("FINISHED",)
    staging = _query(database + "/mlflow", "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'staging'", MODEL_NAME)
    assert staging == (int(version.version),)

    # S3: the run's artifacts and the registered adapter under mlflow/, the DVC objects under dvc/.
    s3 = boto3.client("s3", endpoint_url=services["AWS_ENDPOINT_URL"], aws_access_key_id=services["AWS_ACCESS_KEY_ID"],
                      aws_secret_access_key=services["AWS_SECRET_ACCESS_KEY"], region_name=services["AWS_DEFAULT_REGION"])
    keys = {o["Key"] for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket) for o in page.get("Contents", [])}
    experiment_id = run.info.experiment_id
    assert f"mlflow/{experiment_id}/{run.info.run_id}/artifacts/config.resolved.yaml" in keys
    assert f"mlflow/{experiment_id}/{run.info.run_id}/artifacts/plots/loss_curves.png" in keys
    [weights_key] = [k for k in keys if k.startswith(f"mlflow/{experiment_id}/models/") and k.endswith("adapter/adapter_model.safetensors")]
    # Through the server (models:/ would consult the process-wide registry URI instead of this one).
    served = Path(mlflow.artifacts.download_artifacts(artifact_uri=client.get_model_version_download_uri(MODEL_NAME, version.version),
                                                      dst_path=str(tmp_path / "dl"), tracking_uri=uri))
    stored = s3.get_object(Bucket=bucket, Key=weights_key)["Body"].read()
    assert (served / "artifacts" / "adapter" / "adapter_model.safetensors").read_bytes() == stored
    digest = version.tags["data_md5"]
    manifest_key = f"dvc/files/md5/{digest[:2]}/{digest[2:]}.dir"
    assert manifest_key in keys
    for entry in json.loads(s3.get_object(Bucket=bucket, Key=manifest_key)["Body"].read()):
        assert f"dvc/files/md5/{entry['md5'][:2]}/{entry['md5'][2:]}" in keys, entry["relpath"]

    # Prefect: the flow run completed on the server, which keeps it in Postgres.
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowFilterName, FlowRunFilter, FlowRunFilterState, FlowRunFilterStateType
    from prefect.settings import PREFECT_API_AUTH_STRING, PREFECT_API_URL, temporary_settings

    prefect_settings = {PREFECT_API_URL: services["PREFECT_API_URL"], PREFECT_API_AUTH_STRING: prefect_login}
    with temporary_settings(prefect_settings), get_client(sync_client=True) as prefect:
        runs = prefect.read_flow_runs(flow_filter=FlowFilter(name=FlowFilterName(any_=["adapterflow-retrain"])),
                                      flow_run_filter=FlowRunFilter(state=FlowRunFilterState(type=FlowRunFilterStateType(any_=["COMPLETED"]))))
    assert [r.parameters["config_path"] for r in runs] == [str(config)]
    assert _query(database + "/prefect", "SELECT state_type FROM flow_run WHERE id = %s", str(runs[0].id)) == ("COMPLETED",)

    # The GPU template is accepted by `prefect work-pool create` on this server.
    pool = subprocess.run([str(Path(sys.executable).parent / "prefect"), "work-pool", "create", "adapterflow-gpu", "--type", "kubernetes",
                           "--base-job-template", str(INFRA / "k8s" / "gpu-job-template.json")],
                          env=trainer, capture_output=True, text=True, timeout=120)
    assert pool.returncode == 0, pool.stdout + pool.stderr
    with temporary_settings(prefect_settings), get_client(sync_client=True) as prefect:
        created = prefect.read_work_pool("adapterflow-gpu")
    container = created.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]["containers"][0]
    assert created.type == "kubernetes" and container["resources"]["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"

    # Promotion rights: the trainer is stopped before anything is evaluated; the promoter moves @production.
    refused = _adapterflow("promote", MODEL_NAME, env=trainer)
    assert refused.returncode == 5, refused.stderr[-4000:]
    assert (f"needs MANAGE on registered model '{MODEL_NAME}', and MLflow user 'trainer' has EDIT on it; nothing was "
            "evaluated or changed") in refused.stderr
    assert "MANAGE is held by the MLflow admins (admin)" in refused.stderr and "Traceback" not in refused.stderr
    assert client.get_registered_model(MODEL_NAME).aliases == {"staging": version.version}
    assert not read_events(client.get_model_version(MODEL_NAME, version.version).tags)
    promoted = _adapterflow("promote", MODEL_NAME, env=promoter)
    assert promoted.returncode == 0, promoted.stdout + promoted.stderr[-4000:]
    assert f"promoted version {version.version} to @production" in promoted.stdout
    assert client.get_registered_model(MODEL_NAME).aliases == {"staging": version.version, "production": version.version}
    [event] = read_events(client.get_model_version(MODEL_NAME, version.version).tags).values()
    assert (event["action"], event["by"]) == ("promoted", "promoter")


@pytest.mark.slow
@pytest.mark.xdist_group("native-services")
def test_native_servers_grant_promotion_rights_by_model(native_services, tmp_path, monkeypatch):
    """Without a flow: the preflight's words for a refused login, `infra users` is idempotent and lowers a
    creator's MANAGE, and promote and rollback stop a trainer before anything else (even a missing version)."""
    from mlflow.tracking import MlflowClient

    from adapterflow.errors import RegistryError
    from adapterflow.tasks.auth_users import create_team_users, model_permission
    from adapterflow.tasks.promote import promote, rollback
    from adapterflow.tasks.server_health import check_reachable, check_servers

    state, services = native_services
    uri, model = services["MLFLOW_TRACKING_URI"], "rights-check"
    admin = _read_env_file(state / "admin.env")

    def login(user: str | None, password: str | None = None) -> None:
        for name, value in (("MLFLOW_TRACKING_USERNAME", user), ("MLFLOW_TRACKING_PASSWORD", password)):
            if value is None:
                monkeypatch.delenv(name, raising=False)
            else:
                monkeypatch.setenv(name, value)

    login(None)
    with pytest.raises(RegistryError, match="requires a login[)]: unauthorised: set MLFLOW_TRACKING_USERNAME/MLFLOW_TRACKING_PASSWORD"):
        check_reachable(uri)
    login("admin", "not-the-password")
    with pytest.raises(RegistryError, match="refused MLflow user 'admin' with that password"):
        check_reachable(uri)
    monkeypatch.setenv("PREFECT_API_URL", services["PREFECT_API_URL"])
    monkeypatch.delenv("PREFECT_API_AUTH_STRING", raising=False)
    no_remote = type("Config", (), {"tracking": type("Tracking", (), {"dvc_remote": None})})
    with pytest.raises(RegistryError, match="requires a login[)]: unauthorised: set PREFECT_API_AUTH_STRING"):
        check_servers(no_remote)
    monkeypatch.setenv("PREFECT_API_AUTH_STRING", services["PREFECT_API_AUTH_STRING"])
    check_servers(no_remote)

    # A trainer who created the model holds MANAGE (MLflow gives it to creators): `infra users` lowers it to EDIT.
    login(admin["MLFLOW_TRACKING_USERNAME"], admin["MLFLOW_TRACKING_PASSWORD"])
    first = create_team_users(uri, "rights-other", "trainer2", "promoter2")
    passwords = {user.name: user.password for user in first}
    assert all(passwords.values()) and [u.permission for u in first] == ["EDIT", "MANAGE"]
    login("trainer2", passwords["trainer2"])
    MlflowClient(uri, uri).create_registered_model(model)
    assert model_permission(uri, "trainer2", model) == "MANAGE"
    with pytest.raises(RegistryError, match="needs an MLflow admin, and 'trainer2' is not one"):
        create_team_users(uri, model, "trainer2", "promoter2")
    login(admin["MLFLOW_TRACKING_USERNAME"], admin["MLFLOW_TRACKING_PASSWORD"])
    lowered = create_team_users(uri, model, "trainer2", "promoter2")
    assert [(u.name, u.permission, u.password, u.changed_permission) for u in lowered] == [
        ("trainer2", "EDIT", None, "MANAGE"), ("promoter2", "MANAGE", None, "READ")]
    again = create_team_users(uri, model, "trainer2", "promoter2")
    assert [(u.password, u.changed_permission, u.created) for u in again] == [(None, None, False)] * 2

    # The permission check comes first: the trainer hears about MANAGE, the promoter gets past it.
    locks = tmp_path / "locks"
    login("trainer2", passwords["trainer2"])
    for attempt in (lambda: promote(model, uri, locks), lambda: rollback(model, uri, locks)):
        with pytest.raises(RegistryError, match=f"needs MANAGE on registered model '{model}', and MLflow user 'trainer2' has EDIT"):
            attempt()
    login("promoter2", passwords["promoter2"])
    with pytest.raises(RegistryError, match="has no version with alias @staging"):
        promote(model, uri, locks)
    with pytest.raises(RegistryError, match="has no @production version"):
        rollback(model, uri, locks)
