"""The MLflow UI, as a person sees it in a browser, shows the aliases our CLI set on a real tracking server."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from conftest import ROOT, cls_config, free_port, run_cli, stop_process_group, write_config

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
MODEL_NAME = "tiny-cls-adapter"
# Trains well enough to beat the bare base model, so the first promotion passes.
GOOD = {"train.max_steps": 20, "train.learning_rate": 0.02, "adapter.target_modules": ["query", "value", "dense"],
        "train.checkpoint_every": 100, "promotion": {"metric": "accuracy"}}
BAD = {**GOOD, "train.max_steps": 1, "train.learning_rate": 1e-6}
UI_TIMEOUT_S = 90  # the machine may be shared with other test runs
ALIAS_CHIP = re.compile(r"^@\s(\S+)$")  # "@ staging" (an nbsp in the DOM)
VERSION_CELL = re.compile(r"^Version (\d+)$")

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(not (CHROMIUM.exists() and CHROMEDRIVER.exists()),
                       reason="needs /usr/bin/chromium and /usr/bin/chromedriver: run infra/native/system-packages.sh"),
]


def _wait_for_health(url: str, server: subprocess.Popen, log: Path, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server at {url} not healthy after {timeout_s} s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def mlflow_server(tmp_path):
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    log = tmp_path / "mlflow-server.log"
    command = [str(Path(sys.executable).parent / "mlflow"), "server",
               "--backend-store-uri", f"sqlite:///{tmp_path / 'mlflow.db'}",
               "--artifacts-destination", str(tmp_path / "artifacts"),
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with log.open("w") as sink:
        # No job runner: its eight worker processes only slow a 2-core machine, and the UI needs none.
        env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
        server = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, cwd=tmp_path, env=env, start_new_session=True)
    try:
        _wait_for_health(url, server, log)
        yield url
    finally:
        stop_process_group(server)


@contextlib.contextmanager
def headless_chromium(profile_dir: Path):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    # The background-networking flags keep Chromium from flooding the closed network.
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic",
                 "--no-first-run", "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--window-size=1920,1800", f"--user-data-dir={profile_dir}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(str(CHROMEDRIVER)), options=options)
    try:
        yield driver
    finally:
        driver.quit()


def _artifacts_dir() -> Path:
    folder = Path(os.environ.get("ADAPTERFLOW_TEST_ARTIFACTS") or ROOT / "tests" / "artifacts")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def _cli(*args: str, home: Path) -> str:
    result = run_cli(*args, home=home)
    assert result.returncode == 0, f"adapterflow {' '.join(args)} exited {result.returncode}:\n{result.stderr[-3000:]}"
    return result.stdout


def _retrain(tmp_path, tiny_bert, cls_data, uri: str, overrides: dict, home: Path) -> None:
    config = cls_config(tiny_bert, cls_data, **overrides, **{"tracking.mlflow_uri": uri})
    _cli("run", str(write_config(tmp_path / "run.yaml", config)), home=home)


def _registry_aliases(uri: str) -> dict[str, str]:
    from mlflow.tracking import MlflowClient

    model = MlflowClient(tracking_uri=uri, registry_uri=uri).get_registered_model(MODEL_NAME)
    return {alias: str(version) for alias, version in model.aliases.items()}


def _visible_aliases(lines: list[str]) -> set[str]:
    """Alias chips render as a line of their own, '@ name'; the description's '@staging' never does."""
    return {match.group(1) for line in lines if (match := ALIAS_CHIP.match(line))}


def _aliases_in_versions_table(driver) -> dict[str, str]:
    """{alias: version} as the versions table shows them, read from its rows' visible text."""
    from selenium.webdriver.common.by import By

    shown = {}
    for row in driver.find_elements(By.CSS_SELECTOR, "[role=row]"):
        lines = row.text.splitlines()
        versions = [match.group(1) for line in lines if (match := VERSION_CELL.match(line))]
        if len(versions) == 1:
            shown.update(dict.fromkeys(_visible_aliases(lines), versions[0]))
    return shown


def _aliases_in_version_page(driver) -> set[str]:
    from selenium.webdriver.common.by import By

    return _visible_aliases(driver.find_element(By.TAG_NAME, "body").text.splitlines())


def _schema_inputs(driver) -> set[str]:
    """Input column names the version page's Schema section lists; its collapsed "Inputs (n)" row is opened once."""
    from selenium.webdriver.common.by import By

    lines = [line.strip() for line in driver.find_element(By.TAG_NAME, "body").text.splitlines()]
    if "Schema" not in lines:
        return set()
    section = lines[lines.index("Schema"):][:40]
    shown = {line.split()[0] for line in section if line.split() and line.split()[0] in ("text", "prompt")}  # "text (required)"
    if not shown and not getattr(driver, "inputs_opened", False):
        rows = driver.find_elements(By.XPATH, "//*[starts-with(normalize-space(text()), 'Inputs (')]")
        if rows:
            rows[0].click()
            driver.inputs_opened = True  # a second click would fold it again
    return shown


def _scroll_into_view(driver, css: str) -> None:
    from selenium.webdriver.common.by import By

    elements = driver.find_elements(By.CSS_SELECTOR, css)
    if elements:
        driver.execute_script("arguments[0].scrollIntoView({block: 'end'})", elements[0])


def _open_until(driver, url: str, name: str, read, expected, scroll_to: str | None = None):
    """Load a page and wait until `read(driver)` equals `expected`; screenshot either way, keep the HTML on failure."""
    from selenium.common.exceptions import StaleElementReferenceException, TimeoutException
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    seen = []  # the React app re-renders while it loads: remember the last reading for the failure message
    try:
        WebDriverWait(driver, UI_TIMEOUT_S, poll_frequency=0.5, ignored_exceptions=[StaleElementReferenceException]).until(
            lambda d: seen.append(read(d)) or seen[-1] == expected)
        failed = False
    except TimeoutException:
        failed = True
    if scroll_to:
        _scroll_into_view(driver, scroll_to)
    folder = _artifacts_dir()
    driver.save_screenshot(str(folder / f"{name}.png"))
    if failed:
        (folder / f"{name}.html").write_text(driver.page_source)
    assert not failed, (f"{url} showed {seen[-1] if seen else 'nothing readable'} instead of {expected} after "
                        f"{UI_TIMEOUT_S} s; see {folder / name}.png and .html")


def test_registered_model_page_shows_staging_and_production_aliases(
        prefect_server, tmp_path, tiny_bert, cls_data, mlflow_server):
    home = tmp_path / "state"
    _retrain(tmp_path, tiny_bert, cls_data, mlflow_server, GOOD, home)
    promoted = _cli("promote", MODEL_NAME, "--tracking-uri", mlflow_server, home=home)
    assert "promoted version 1 to @production" in promoted
    _retrain(tmp_path, tiny_bert, cls_data, mlflow_server, BAD, home)  # a new version takes @staging
    expected = {"staging": "2", "production": "1"}
    assert _registry_aliases(mlflow_server) == expected

    model_url = f"{mlflow_server}/#/models/{MODEL_NAME}"
    with headless_chromium(tmp_path / "chromium-profile") as browser:  # started only now: training runs without it
        _open_until(browser, model_url, "mlflow_registered_model", _aliases_in_versions_table, expected, scroll_to="[role=table]")
        _open_until(browser, f"{model_url}/versions/1", "mlflow_model_version_1", _aliases_in_version_page, {"production"})
        # The registered model logs its signature: the version page shows the input column.
        _open_until(browser, f"{model_url}/versions/2", "mlflow_model_version_2_schema", _schema_inputs, {"text"})
