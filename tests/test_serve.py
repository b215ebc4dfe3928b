"""`adapterflow serve` refuses a schedule it cannot run. Scheduled runs against `prefect server start` (two runs, the
second a skip, through server restarts) are tests/test_outages.py's served-deployment test."""

from __future__ import annotations

import pytest
from conftest import cls_config, run_cli, write_config

pytestmark = pytest.mark.slow  # a CLI subprocess


def test_invalid_cron_is_refused(tmp_path, tiny_bert, cls_data):
    config = write_config(tmp_path / "c.yaml", cls_config(tiny_bert, cls_data, schedule={"cron": "61 * * * *"}))
    result = run_cli("serve", str(config), home=tmp_path / "state")
    assert result.returncode == 2 and "schedule.cron is not a valid schedule" in result.stderr
