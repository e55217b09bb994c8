"""The demo end to end: local endpoint, fault proxy, deployed functions, replay and verification.

Each test runs ``taxi-pipeline demo`` as a subprocess, which starts its own
MiniStack and fault proxy and stops them when it ends. A subprocess keeps
the demo's SparkSession and environment apart from the test session's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.endpoint]

REPO_ROOT = Path(__file__).resolve().parents[2]
DEMO_TIMEOUT_SECONDS = 420
ENDPOINT_LINE = re.compile(r"endpoint http://127\.0\.0\.1:(\d+), fault proxy http://127\.0\.0\.1:(\d+)")


def demo_command(*options: str) -> list[str]:
    return [sys.executable, "-m", "taxi_pipeline.tooling.cli", "demo", *options]


def run_demo(*options: str) -> tuple[subprocess.CompletedProcess, dict]:
    completed = subprocess.run(
        demo_command(*options, "--json"),
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=DEMO_TIMEOUT_SECONDS,
        env=os.environ.copy(),
    )
    assert completed.stdout.strip(), f"the demo printed no result; its progress:\n{completed.stderr}"
    return completed, json.loads(completed.stdout)


def port_is_open(port: int) -> bool:
    with socket.socket() as probe:
        probe.settimeout(1)
        return probe.connect_ex(("127.0.0.1", port)) == 0


@pytest.mark.timeout(DEMO_TIMEOUT_SECONDS + 60)
def test_demo_on_real_trips_passes(sample_dir):
    completed, result = run_demo("--data", str(sample_dir), "--limit", "40", "--failure-rate", "0.2")

    assert completed.returncode == 0, completed.stderr
    assert result["passed"] is True, json.dumps(result["verification"], indent=2)
    assert result["synthetic"] is False
    assert result["trips"] == 40
    assert result["sent"] == {
        "total": 94,
        "event": 80,
        "duplicate": 4,
        "corrupted": 10,
        "ends_first_trips": 4,
    }
    statuses = {check["name"]: check["status"] for check in result["verification"]["checks"]}
    assert set(statuses.values()) == {"PASS"}
    assert len(statuses) == 7

    # Faults were injected, every failed event went through the retry queue
    # and the replay wrote each of its messages.
    faults = result["stream_faults"]
    assert faults["faulted_events"] > 0
    assert faults["faults_injected"] >= faults["faulted_events"]
    retried = result["retry_messages_before_replay"]
    assert retried >= faults["faulted_events"]
    outcomes = result["replay"]["outcomes"]
    assert outcomes.get("applied", 0) == faults["faulted_events"]
    assert outcomes.get("applied", 0) + outcomes.get("duplicate", 0) == retried
    assert "dead_lettered" not in outcomes

    # Each valid record was either written, found to be a repeat, or failed.
    writes = faults["update_item_outcomes"]
    assert writes["ok"] + writes.get("ConditionalCheckFailedException", 0) + retried == 84
    assert "Summary" in completed.stderr
    assert "result                 PASS" in completed.stderr


@pytest.mark.timeout(DEMO_TIMEOUT_SECONDS + 60)
def test_synthetic_demo_says_so_and_passes():
    completed, result = run_demo(
        "--synthetic", "--synthetic-trips", "30", "--failure-rate", "0.3", "--seed", "3"
    )

    assert completed.returncode == 0, completed.stderr
    assert result["passed"] is True, json.dumps(result["verification"], indent=2)
    assert result["synthetic"] is True
    assert result["trips"] == 30
    assert "SYNTHETIC RUN" in completed.stderr
    assert "not real data" in result["source"]


@pytest.mark.timeout(180)
def test_interrupted_demo_stops_what_it_started():
    process = subprocess.Popen(
        demo_command("--synthetic", "--synthetic-trips", "10"),
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=os.environ.copy(),
    )
    ports: tuple[int, int] | None = None
    lines: list[str] = []
    try:
        # Interrupt once the endpoint and the proxy run and the deployment has begun.
        for line in process.stdout:
            lines.append(line)
            match = ENDPOINT_LINE.search(line)
            if match:
                ports = (int(match.group(1)), int(match.group(2)))
            if ports and "package and deploy" in line:
                break
        assert ports is not None, "".join(lines)
        assert port_is_open(ports[0])
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()

    assert process.returncode == 130, "".join(lines) + output
    assert "interrupted" in output
    deadline = time.monotonic() + 10
    while any(port_is_open(port) for port in ports) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not port_is_open(ports[0]), "MiniStack still listens after the demo was interrupted"
    assert not port_is_open(ports[1]), "the fault proxy still listens after the demo was interrupted"
