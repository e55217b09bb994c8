"""The local AWS endpoint: loopback binding, health, Lambda workers and a clean stop.

Each test starts a MiniStack of its own, because stopping it is part of what
is tested. The session-wide ``endpoint_url`` fixture is not used here.
"""

from __future__ import annotations

import io
import json
import os
import socket
import sys
import zipfile
from pathlib import Path

import boto3
import pytest

from taxi_pipeline.tooling.local_endpoint import (
    DEFAULT_MINISTACK_BIN,
    HEALTH_PATH,
    LocalEndpoint,
    LocalEndpointError,
    check_health,
    find_free_port,
    read_detached,
    start_detached,
    stop_detached,
)

pytestmark = pytest.mark.endpoint

_TCP_LISTEN_STATE = "0A"

# Handler that reports its worker process: pid, process group, interpreter and endpoint URL.
_REPORT_HANDLER = b"""
import os, sys

def lambda_handler(event, context):
    return {
        "pid": os.getpid(),
        "pgid": os.getpgid(0),
        "executable": sys.executable,
        "endpoint_url": os.environ.get("AWS_ENDPOINT_URL"),
    }
"""


def _listening_addresses(port: int) -> set[str]:
    """Return the local addresses of TCP sockets listening on ``port``, from /proc/net."""
    addresses = set()
    for table, family in (("/proc/net/tcp", socket.AF_INET), ("/proc/net/tcp6", socket.AF_INET6)):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            address_hex, port_hex = fields[1].split(":")
            if fields[3] != _TCP_LISTEN_STATE or int(port_hex, 16) != port:
                continue
            # The kernel prints each 32-bit word of the address in host byte order.
            raw = bytes.fromhex(address_hex)
            words = b"".join(raw[i : i + 4][::-1] for i in range(0, len(raw), 4))
            addresses.add(socket.inet_ntop(family, words))
    return addresses


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _process_group_exists(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _invoke_report_function(endpoint: LocalEndpoint) -> dict:
    """Create a Python function on ``endpoint``, invoke it once and return its report."""
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zip_file:
        zip_file.writestr("app.py", _REPORT_HANDLER)

    client = boto3.client("lambda", endpoint_url=endpoint.url, region_name="us-east-1")
    client.create_function(
        FunctionName="endpoint-report",
        Runtime="python3.11",
        Role="arn:aws:iam::000000000000:role/endpoint-report",
        Handler="app.lambda_handler",
        Code={"ZipFile": archive.getvalue()},
        Timeout=30,
    )
    response = client.invoke(FunctionName="endpoint-report", Payload=b"{}")
    assert "FunctionError" not in response, response["Payload"].read()
    return json.loads(response["Payload"].read())


@pytest.fixture
def endpoint(tmp_path: Path):
    """A MiniStack of this test's own, stopped after the test if it still runs."""
    local_endpoint = LocalEndpoint(run_dir=tmp_path)
    local_endpoint.start()
    yield local_endpoint
    local_endpoint.stop()


@pytest.mark.skipif(sys.platform != "linux", reason="reads listening sockets from /proc/net")
def test_endpoint_listens_on_loopback_only(endpoint):
    assert _listening_addresses(endpoint.port) == {"127.0.0.1"}


def test_endpoint_health_lists_services(endpoint):
    health = check_health(endpoint.url + HEALTH_PATH)

    for service in ("dynamodb", "sqs", "sns", "kinesis", "lambda", "cloudformation", "glue"):
        assert health["services"].get(service) == "available", service


def test_endpoint_log_is_in_run_dir(endpoint, tmp_path):
    assert endpoint.log_path == tmp_path / f"ministack-{endpoint.port}.log"
    assert f"port {endpoint.port}" in endpoint.log_path.read_text()


def test_stop_ends_ministack_and_workers(endpoint):
    report = _invoke_report_function(endpoint)
    ministack_pid = endpoint.pid
    tmp_dir = endpoint.tmp_dir
    assert report["pgid"] == ministack_pid
    assert _process_exists(report["pid"])

    endpoint.stop()

    assert not endpoint.is_running()
    assert not _process_exists(ministack_pid)
    assert not _process_exists(report["pid"])
    assert not _process_group_exists(ministack_pid)
    assert not tmp_dir.exists()
    assert endpoint.log_path.exists()


def test_extra_env_reaches_lambda_workers(tmp_path):
    # The handler only reads the variable, so nothing contacts port 9 (discard).
    proxy_url = "http://127.0.0.1:9"
    with LocalEndpoint(run_dir=tmp_path, extra_env={"AWS_ENDPOINT_URL": proxy_url}) as endpoint:
        report = _invoke_report_function(endpoint)

    assert report["endpoint_url"] == proxy_url


def test_workers_run_ministack_interpreter(endpoint):
    report = _invoke_report_function(endpoint)

    assert Path(report["executable"]).parent == DEFAULT_MINISTACK_BIN.parent
    assert report["endpoint_url"] == endpoint.url


def test_context_manager_stops_endpoint(tmp_path):
    with LocalEndpoint(run_dir=tmp_path) as endpoint:
        pid = endpoint.pid
        assert endpoint.is_running()

    assert not endpoint.is_running()
    assert not _process_group_exists(pid)


def test_missing_ministack_names_make_setup(tmp_path):
    endpoint = LocalEndpoint(run_dir=tmp_path, ministack_bin=tmp_path / "missing" / "ministack")

    with pytest.raises(LocalEndpointError, match="make setup"):
        endpoint.start()


def test_startup_failure_names_log_and_output(tmp_path):
    failing_bin = tmp_path / "ministack"
    failing_bin.write_text("#!/bin/sh\necho 'port is unusable' >&2\nexit 3\n")
    failing_bin.chmod(0o755)
    port = find_free_port()
    endpoint = LocalEndpoint(port=port, run_dir=tmp_path, ministack_bin=failing_bin)

    with pytest.raises(LocalEndpointError) as raised:
        endpoint.start()

    message = str(raised.value)
    assert "exited with code 3" in message
    assert str(tmp_path / f"ministack-{port}.log") in message
    assert "port is unusable" in message
    assert not endpoint.is_running()


def test_startup_timeout_names_log(tmp_path):
    silent_bin = tmp_path / "ministack"
    silent_bin.write_text("#!/bin/sh\necho 'still starting'\nexec sleep 60\n")
    silent_bin.chmod(0o755)
    endpoint = LocalEndpoint(run_dir=tmp_path, ministack_bin=silent_bin, startup_timeout=1.0)

    with pytest.raises(LocalEndpointError) as raised:
        endpoint.start()

    message = str(raised.value)
    assert "timed out after 1 s" in message
    assert "still starting" in message
    assert not endpoint.is_running()


def test_detached_endpoint_is_recorded_and_stopped(tmp_path):
    record = start_detached(run_dir=tmp_path)
    try:
        assert record["already_running"] is False
        assert read_detached(tmp_path)["pid"] == record["pid"]
        assert start_detached(run_dir=tmp_path)["already_running"] is True
        check_health(record["url"] + HEALTH_PATH)
    finally:
        stopped = stop_detached(run_dir=tmp_path)

    assert stopped["pid"] == record["pid"]
    assert not _process_group_exists(record["pid"])
    assert not (tmp_path / "endpoint.json").exists()
    assert stop_detached(run_dir=tmp_path) is None
