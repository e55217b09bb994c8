"""Start and stop MiniStack, the local AWS endpoint for tests, the demo and manual runs.

MiniStack runs from its own virtual environment (``.venv-ministack``, made by
``make setup``) as a foreground subprocess in a process group of its own. It
runs Lambda code in worker subprocesses that inherit its environment and its
process group, so stopping the group stops the workers too.

Run as a module for a long-running endpoint that outlives the command::

    python -m taxi_pipeline.tooling.local_endpoint start|stop|status
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path
from types import TracebackType

logger = logging.getLogger(__name__)

# lib/taxi_pipeline/tooling/local_endpoint.py -> the repository root. The
# tooling package is not shipped, so it always runs from a source checkout.
REPO_ROOT = Path(__file__).resolve().parents[3]
DEFAULT_MINISTACK_BIN = REPO_ROOT / ".venv-ministack" / "bin" / "ministack"
DEFAULT_RUN_DIR = REPO_ROOT / ".run"
DETACHED_RECORD_NAME = "endpoint.json"

HOST = "127.0.0.1"
DEFAULT_REGION = "us-east-1"
HEALTH_PATH = "/_ministack/health"
DEFAULT_STARTUP_TIMEOUT_SECONDS = 60.0
DEFAULT_STOP_TIMEOUT_SECONDS = 10.0
LOG_TAIL_LINES = 20

# Variables that could point a client at a real account or at another
# endpoint. MiniStack's Lambda workers inherit its environment, so the
# endpoint, the tests and the benchmark all remove these, and every
# AWS_ENDPOINT_URL_<SERVICE> variable by prefix, before setting dummy values.
SCRUBBED_AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
    "AWS_CREDENTIAL_EXPIRATION",
    "AWS_ROLE_ARN",
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_SESSION_NAME",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
)


def is_scrubbed_aws_variable(name: str) -> bool:
    """Return whether ``name`` could select real credentials, a profile or another endpoint."""
    return name in SCRUBBED_AWS_VARIABLES or name.startswith("AWS_ENDPOINT_URL")


def dummy_aws_environment(region: str = DEFAULT_REGION) -> dict[str, str]:
    """Return dummy credentials, no config files and no metadata service, for local clients."""
    return {
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_CONFIG_FILE": os.devnull,
        "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
        "AWS_DEFAULT_REGION": region,
        "AWS_REGION": region,
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def no_proxy_with_loopback(current: str | None) -> str:
    """Return a ``NO_PROXY`` value that adds 127.0.0.1 and localhost, so no proxy sees local requests."""
    hosts = [host for host in (current or "").split(",") if host]
    hosts += [host for host in (HOST, "localhost") if host not in hosts]
    return ",".join(hosts)


_PR_SET_PDEATHSIG = 1


class LocalEndpointError(RuntimeError):
    """MiniStack could not be started, reached or stopped."""


def find_free_port(host: str = HOST) -> int:
    """Return a TCP port on ``host`` that was free a moment ago.

    Another process can take the port before MiniStack binds it, so
    ``LocalEndpoint.start`` retries with a new port when MiniStack exits early.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def build_ministack_environment(
    port: int,
    tmp_dir: Path,
    region: str = DEFAULT_REGION,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Build MiniStack's process environment, which its Lambda workers inherit.

    ``extra_env`` is applied last. An ``AWS_ENDPOINT_URL`` in it reaches the
    Lambda workers unchanged (MiniStack 1.5.33 sets its own URL only when the
    variable is absent), unless a function's own environment sets one.
    """
    env = {name: value for name, value in os.environ.items() if not is_scrubbed_aws_variable(name)}

    env.update(dummy_aws_environment(region))
    env.update(
        {
            "BIND_HOST": HOST,
            "GATEWAY_PORT": str(port),
            "MINISTACK_REGION": region,
            # MiniStack's pid file, Lambda code folders and worker temp files
            # go here, so stop() can remove what a killed worker left behind.
            "TMPDIR": str(tmp_dir),
            "PERSIST_STATE": "0",
            "S3_PERSIST": "0",
        }
    )
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = no_proxy_with_loopback(env.get(name))

    env.update(extra_env or {})
    return env


def read_log_tail(log_path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """Return the last ``lines`` lines of a log file, or a note that it is missing."""
    try:
        text = log_path.read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return f"(no log file at {log_path})"
    return "\n".join(text.splitlines()[-lines:])


def _parent_death_signal_setter():
    """Return a pre-exec hook that has Linux send SIGTERM to the child when its parent thread exits.

    It covers a parent killed with SIGKILL, which runs no cleanup of its own.
    libc is loaded here, in the parent, so the hook between fork and exec
    only makes one system call.
    """
    prctl = ctypes.CDLL(None, use_errno=True).prctl

    def set_parent_death_signal() -> None:
        prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)

    return set_parent_death_signal


def _process_group_exists(pgid: int) -> bool:
    # A detached MiniStack started by this same process is its child, and as
    # a zombie it would keep the group alive, so it is reaped first.
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pgid, os.WNOHANG)
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_ministack_process(pid: int) -> bool:
    """Tell whether ``pid`` is a running MiniStack, so a reused pid is never signalled."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return b"ministack" in cmdline


def _terminate_process_group(pgid: int, leader: subprocess.Popen | None, timeout: float) -> None:
    """Send SIGTERM to a process group, then SIGKILL to whatever is left after ``timeout``.

    ``leader`` is the group leader if this process started it. It is reaped
    here, because a zombie leader still counts as a member of the group.
    """
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGTERM)

    deadline = time.monotonic() + timeout
    if leader is not None:
        with contextlib.suppress(subprocess.TimeoutExpired):
            leader.wait(timeout=timeout)
    while _process_group_exists(pgid) and time.monotonic() < deadline:
        time.sleep(0.1)

    # Lambda workers outlive MiniStack for a moment when they miss the
    # SIGTERM, so the group is killed even after the leader has exited.
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, signal.SIGKILL)
    if leader is not None:
        leader.wait(timeout=timeout)

    deadline = time.monotonic() + timeout
    while _process_group_exists(pgid):
        if time.monotonic() >= deadline:
            raise LocalEndpointError(
                f"process group {pgid} still has processes after SIGKILL (list them with ps -g {pgid})"
            )
        time.sleep(0.05)


class LocalEndpoint:
    """A MiniStack process on 127.0.0.1, usable as a context manager.

    Parameters
    ----------
    port:
        TCP port on 127.0.0.1. A free one is picked when omitted.
    extra_env:
        Environment variables added last to MiniStack's environment, and so
        to its Lambda workers' (for example ``AWS_ENDPOINT_URL`` of a proxy).
    region:
        Region of MiniStack's resources (``MINISTACK_REGION``).
    ministack_bin:
        The ``ministack`` entry point; ``.venv-ministack/bin/ministack`` by default.
    run_dir:
        Folder for the log file and temporary files; ``.run/`` by default.
    startup_timeout:
        Seconds to wait for the health check to pass.
    stop_with_parent:
        Have Linux send SIGTERM to MiniStack when the thread that called
        ``start()`` exits. Start from the main thread when this is on,
        because a worker thread that ends would stop MiniStack with it.

    Examples
    --------
    >>> with LocalEndpoint() as endpoint:  # doctest: +SKIP
    ...     boto3.client("sqs", endpoint_url=endpoint.url).list_queues()
    """

    def __init__(
        self,
        port: int | None = None,
        extra_env: Mapping[str, str] | None = None,
        region: str = DEFAULT_REGION,
        ministack_bin: Path | None = None,
        run_dir: Path | None = None,
        startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_SECONDS,
        stop_with_parent: bool = True,
    ) -> None:
        if startup_timeout <= 0:
            raise ValueError(f"startup_timeout must be positive, got {startup_timeout!r}")
        self._requested_port = port
        self._extra_env = dict(extra_env or {})
        self._region = region
        self._ministack_bin = Path(ministack_bin) if ministack_bin else DEFAULT_MINISTACK_BIN
        self._run_dir = Path(run_dir) if run_dir else DEFAULT_RUN_DIR
        self._startup_timeout = startup_timeout
        self._stop_with_parent = stop_with_parent and sys.platform == "linux"
        self._port: int | None = None
        self._process: subprocess.Popen | None = None

    @property
    def port(self) -> int:
        """TCP port on 127.0.0.1 that MiniStack listens on."""
        if self._port is None:
            raise LocalEndpointError("the endpoint has not been started")
        return self._port

    @property
    def url(self) -> str:
        """Endpoint URL for boto3's ``endpoint_url`` or ``AWS_ENDPOINT_URL``."""
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """MiniStack's log file, ``.run/ministack-<port>.log``."""
        return self._run_dir / f"ministack-{self.port}.log"

    @property
    def pid(self) -> int:
        """Process id of MiniStack, which is also its process group id."""
        if self._process is None:
            raise LocalEndpointError("the endpoint has not been started")
        return self._process.pid

    @property
    def tmp_dir(self) -> Path:
        """MiniStack's TMPDIR, removed by ``stop()``."""
        return self._run_dir / f"ministack-{self.port}.tmp"

    def is_running(self) -> bool:
        """Tell whether the MiniStack process is still alive."""
        return self._process is not None and self._process.poll() is None

    def start(self) -> LocalEndpoint:
        """Start MiniStack and wait until its health check passes.

        Raises ``LocalEndpointError`` when ``.venv-ministack`` is missing, or
        when MiniStack exits or stays unhealthy (the message names the log
        file and shows its last lines).
        """
        if self._process is not None:
            raise LocalEndpointError(f"the endpoint is already running at {self.url}")
        if not os.access(self._ministack_bin, os.X_OK):
            raise LocalEndpointError(
                f"MiniStack not found at {self._ministack_bin}: run `make setup` "
                "in the repository root to create .venv-ministack"
            )
        self._run_dir.mkdir(parents=True, exist_ok=True)

        # A port picked here can be taken before MiniStack binds it, so an
        # early exit with a picked port is retried on another one.
        attempts = 1 if self._requested_port else 3
        for attempt in range(1, attempts + 1):
            self._port = self._requested_port or find_free_port()
            self._spawn()
            try:
                self._wait_until_healthy()
            except LocalEndpointError:
                exited_early = not self.is_running()
                self._kill_process_group()
                if exited_early and attempt < attempts:
                    logger.warning(
                        "MiniStack exited during startup on port %d, retrying on another port "
                        "(attempt %d of %d); log: %s",
                        self._port,
                        attempt,
                        attempts,
                        self.log_path,
                    )
                    continue
                raise
            break

        if self._stop_with_parent:
            atexit.register(self.stop)
        logger.info("MiniStack started at %s (pid %d, log %s)", self.url, self.pid, self.log_path)
        return self

    def stop(self, timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS) -> None:
        """Stop MiniStack and its Lambda workers, and remove its temporary files.

        Does nothing when the endpoint is not running.
        """
        if self._process is None:
            return
        atexit.unregister(self.stop)
        pid = self._process.pid
        self._kill_process_group(timeout)
        logger.info("MiniStack stopped (pid %d, port %d)", pid, self.port)

    def _spawn(self) -> None:
        self.tmp_dir.mkdir(parents=True, exist_ok=True)
        env = build_ministack_environment(self.port, self.tmp_dir, self._region, self._extra_env)

        with open(self.log_path, "wb") as log_file:
            self._process = subprocess.Popen(
                [str(self._ministack_bin)],
                stdin=subprocess.DEVNULL,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self._run_dir,
                process_group=0,
                preexec_fn=_parent_death_signal_setter() if self._stop_with_parent else None,
            )
        logger.debug("MiniStack spawned (pid %d, port %d)", self._process.pid, self.port)

    def _wait_until_healthy(self) -> None:
        deadline = time.monotonic() + self._startup_timeout
        health_url = f"{self.url}{HEALTH_PATH}"
        last_error = "no response"

        while time.monotonic() < deadline:
            if not self.is_running():
                raise LocalEndpointError(
                    f"MiniStack exited with code {self._process.returncode} during startup "
                    f"on port {self.port}. Last lines of {self.log_path}:\n"
                    f"{read_log_tail(self.log_path)}"
                )
            try:
                check_health(health_url, timeout=2.0)
                return
            except LocalEndpointError as exc:
                last_error = str(exc)
            time.sleep(0.1)

        raise LocalEndpointError(
            f"MiniStack health check at {health_url} timed out after "
            f"{self._startup_timeout:.0f} s ({last_error}). Last lines of {self.log_path}:\n"
            f"{read_log_tail(self.log_path)}"
        )

    def _kill_process_group(self, timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS) -> None:
        process, self._process = self._process, None
        if process is None:
            return
        try:
            _terminate_process_group(process.pid, process, timeout)
        finally:
            shutil.rmtree(self.tmp_dir, ignore_errors=True)

    def __enter__(self) -> LocalEndpoint:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()


def check_health(health_url: str, timeout: float = 2.0) -> dict:
    """Fetch MiniStack's health document, raising ``LocalEndpointError`` unless it returns 200.

    Proxies from the environment are bypassed, because the endpoint is on loopback.
    """
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(health_url, timeout=timeout) as response:
            body = response.read()
    except (urllib.error.URLError, OSError) as exc:
        raise LocalEndpointError(f"health check at {health_url} failed: {exc}") from exc
    try:
        return json.loads(body)
    except json.JSONDecodeError as exc:
        raise LocalEndpointError(f"health check at {health_url} returned invalid JSON") from exc


def _detached_record_path(run_dir: Path) -> Path:
    return run_dir / DETACHED_RECORD_NAME


def read_detached(run_dir: Path | None = None) -> dict | None:
    """Return the record of a detached endpoint if its process still runs, else None.

    A record whose process is gone is removed.
    """
    record_path = _detached_record_path(Path(run_dir) if run_dir else DEFAULT_RUN_DIR)
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except json.JSONDecodeError:
        logger.warning("Removing unreadable endpoint record %s", record_path)
        record_path.unlink(missing_ok=True)
        return None

    if not _is_ministack_process(record["pid"]):
        logger.info("Removing the record of MiniStack pid %d, which no longer runs", record["pid"])
        record_path.unlink(missing_ok=True)
        return None
    return record


def start_detached(
    port: int | None = None,
    extra_env: Mapping[str, str] | None = None,
    region: str = DEFAULT_REGION,
    run_dir: Path | None = None,
) -> dict:
    """Start MiniStack so that it outlives this process, and record it in ``.run/endpoint.json``.

    Returns the record (``pid``, ``port``, ``url``, ``log_path``, ``tmp_dir``).
    When a recorded endpoint still runs, returns its record with
    ``"already_running": True`` and starts nothing.
    """
    run_dir = Path(run_dir) if run_dir else DEFAULT_RUN_DIR
    existing = read_detached(run_dir)
    if existing is not None:
        return {**existing, "already_running": True}

    endpoint = LocalEndpoint(
        port=port,
        extra_env=extra_env,
        region=region,
        run_dir=run_dir,
        stop_with_parent=False,
    )
    endpoint.start()
    record = {
        "pid": endpoint.pid,
        "port": endpoint.port,
        "url": endpoint.url,
        "log_path": str(endpoint.log_path),
        "tmp_dir": str(endpoint.tmp_dir),
        "started_at": time.time(),
    }
    _detached_record_path(run_dir).write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return {**record, "already_running": False}


def stop_detached(run_dir: Path | None = None, timeout: float = DEFAULT_STOP_TIMEOUT_SECONDS) -> dict | None:
    """Stop the endpoint recorded in ``.run/endpoint.json`` and remove the record.

    Returns the record of the stopped endpoint, or None when none was running.
    """
    run_dir = Path(run_dir) if run_dir else DEFAULT_RUN_DIR
    record = read_detached(run_dir)
    if record is None:
        return None

    # This process is not MiniStack's parent (init reaps it), so there is no
    # leader to wait for: the group is polled until it is empty.
    _terminate_process_group(record["pid"], None, timeout)
    shutil.rmtree(record["tmp_dir"], ignore_errors=True)
    _detached_record_path(run_dir).unlink(missing_ok=True)
    logger.info("MiniStack stopped (pid %d, port %d)", record["pid"], record["port"])
    return record


def main(argv: list[str] | None = None) -> int:
    """Run the ``start``, ``stop`` and ``status`` commands for a detached endpoint."""
    parser = argparse.ArgumentParser(
        prog="python -m taxi_pipeline.tooling.local_endpoint",
        description="Run MiniStack on 127.0.0.1 in the background for manual use.",
    )
    commands = parser.add_subparsers(dest="command", required=True)
    start_parser = commands.add_parser("start", help="start MiniStack unless one is recorded")
    start_parser.add_argument("--port", type=int, help="TCP port on 127.0.0.1 (default: a free one)")
    commands.add_parser("stop", help="stop the recorded MiniStack")
    commands.add_parser("status", help="print the recorded MiniStack, if it runs")
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "start":
            record = start_detached(port=args.port)
            state = "already running" if record["already_running"] else "started"
            print(f"MiniStack {state} at {record['url']} (pid {record['pid']})")
            print(f"  log:  {record['log_path']}")
            print(f"  use:  export AWS_ENDPOINT_URL={record['url']}")
            print("  stop: make endpoint-stop")
        elif args.command == "stop":
            record = stop_detached()
            if record is None:
                print("No recorded MiniStack is running.")
            else:
                print(f"MiniStack at {record['url']} (pid {record['pid']}) stopped")
        else:
            record = read_detached()
            if record is None:
                print("No recorded MiniStack is running.")
                return 1
            print(f"MiniStack running at {record['url']} (pid {record['pid']})")
            print(f"  log:  {record['log_path']}")
    except LocalEndpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
