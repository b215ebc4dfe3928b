"""Outages of the services a run talks to (MLflow, the S3 endpoint of the DVC remote, the Prefect API).

Whoever notices a service is down or back reports it here: one line when an outage starts, one
when it ends with its length, never a traceback; the run's summary lists them all. One instance
per process (`OUTAGES`), reset when a flow run starts: a served deployment runs many flows.
"""

from __future__ import annotations

import logging
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from contextlib import contextmanager

from adapterflow.redact import without_login

HEALTH_TIMEOUT_SECONDS = 2.0


class Outages:
    def __init__(self, say: Callable[[str], None] | None = None):
        self.say = say or logging.getLogger("adapterflow.progress").warning
        self.started: dict[str, float] = {}
        self.ended: list[tuple[str, float]] = []

    def down(self, service: str, consequence: str) -> None:
        if service not in self.started:
            self.started[service] = time.monotonic()
            self.say(f"{service} is not answering; {consequence}")

    def up(self, service: str) -> None:
        started = self.started.pop(service, None)
        if started is not None:
            seconds = time.monotonic() - started
            self.ended.append((service, seconds))
            self.say(f"{service} is back after {seconds:.0f} s")

    def is_down(self, service: str) -> bool:
        return service in self.started

    def report(self) -> list[str]:
        """Each outage of this run, ended or still going, for the summary."""
        now = time.monotonic()
        lines = [f"{service}: down {seconds:.0f} s" for service, seconds in self.ended]
        return lines + [f"{service}: down since {now - started:.0f} s ago, still down" for service, started in self.started.items()]

    def reset(self, say: Callable[[str], None] | None = None) -> None:
        self.__init__(say)


OUTAGES = Outages()


def http_answers(url: str, any_status: bool = False, timeout: float = HEALTH_TIMEOUT_SECONDS) -> bool:
    """One quick GET (no login in the URL: urllib would take it for the host); MLflow's own client would retry a
    dead server for minutes before it says so. `any_status`: an error status counts as up (S3 answers 403 unsigned);
    otherwise a 502 from a proxy in front of a dead server is down."""
    try:
        urllib.request.urlopen(without_login(url), timeout=timeout).close()
    except urllib.error.HTTPError:
        return any_status
    except (urllib.error.URLError, OSError):
        return False
    return True


def mlflow_answers(uri: str) -> bool:
    """A local store (SQLite, a folder) has no outages; a server answers its /health."""
    if not uri.startswith(("http://", "https://")):
        return True
    return http_answers(uri.rstrip("/") + "/health")


def watching(url: str, service: str, consequence: str, every_seconds: float = 2.0, outages: Outages | None = None):
    """For the block, a thread that asks `url` every few seconds and reports `service` down and back: for a service
    nothing else in the run would notice (the Prefect API, whose client retries quietly)."""
    outages = outages or OUTAGES

    def watch() -> None:
        if http_answers(url):
            outages.up(service)
        else:
            outages.down(service, consequence)

    return every(every_seconds, watch, "adapterflow-service-watch")


@contextmanager
def every(seconds: float, action: Callable[[], None], name: str):
    """For the block, `action()` every `seconds` on a daemon thread (first after `seconds`); joined at the end."""
    stop = threading.Event()

    def loop() -> None:
        while not stop.wait(seconds):
            action()

    thread = threading.Thread(target=loop, name=name, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
