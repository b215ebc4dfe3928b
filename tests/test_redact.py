"""The one redaction helper: passwords, secret query values and secret environment values never survive."""

import logging

import pytest

from adapterflow.redact import MASK, RedactingFilter, redact_text, redact_uri

SENTINEL = "S3ntinel-Pa55word"


@pytest.mark.parametrize(
    "uri, kept",
    [
        (f"postgresql://user:{SENTINEL}@db.internal:5432/mlflow", "postgresql://user:***@db.internal:5432/mlflow"),
        (f"http://alice:{SENTINEL}@mlflow:5000", "http://alice:***@mlflow:5000"),
        (f"https://mlflow.example/api?token={SENTINEL}&x=1", "https://mlflow.example/api?token=***&x=1"),
        (f"s3://bucket/path?X-Amz-Signature={SENTINEL}", "s3://bucket/path?X-Amz-Signature=***"),
        ("sqlite:////tmp/state/mlflow.db", "sqlite:////tmp/state/mlflow.db"),
        ("http://mlflow:5000", "http://mlflow:5000"),
    ],
)
def test_uris_lose_their_secrets_and_keep_the_rest(uri, kept):
    assert redact_uri(uri) == kept


def test_free_text_redacts_every_uri_inside_it():
    text = f"MLflow at postgresql://u:{SENTINEL}@h/db cannot be reached; nor 'http://a:{SENTINEL}@x:1/p'."
    redacted = redact_text(text)
    assert SENTINEL not in redacted and redacted.count(MASK) == 2 and "postgresql://u:***@h/db" in redacted


def test_values_of_secret_environment_variables_are_masked_anywhere(monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", SENTINEL)
    assert redact_text(f"auth failed with password {SENTINEL}") == "auth failed with password ***"


def test_log_records_are_rewritten_before_any_handler_formats_them():
    record = logging.LogRecord("x", logging.ERROR, __file__, 1, "cannot reach %s", (f"http://u:{SENTINEL}@h",), None)
    assert RedactingFilter().filter(record) and SENTINEL not in record.getMessage()


def test_a_probe_url_loses_its_login_and_keeps_the_rest():
    from adapterflow.redact import without_login

    assert without_login(f"http://alice:{SENTINEL}@mlflow:5000/health") == "http://mlflow:5000/health"
    assert without_login("http://mlflow:5000/health") == "http://mlflow:5000/health"
