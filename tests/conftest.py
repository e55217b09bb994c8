"""Shared fixtures: dummy credentials, the local AWS endpoint, clients, Spark, the sample data.

Every test runs with dummy credentials and no AWS profile, so no test can
reach a real account. Tests that use ``endpoint_url`` (directly or through a
client fixture) share one MiniStack per session on 127.0.0.1.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

import boto3
import pytest
from botocore.config import Config

from taxi_pipeline.tooling.local_endpoint import (
    HEALTH_PATH,
    LocalEndpoint,
    LocalEndpointError,
    check_health,
    dummy_aws_environment,
    is_scrubbed_aws_variable,
    no_proxy_with_loopback,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SAMPLE_DIR = REPO_ROOT.parent / "shared" / "data" / "sf_taxi_trips"
SAMPLE_FILES = ("start_taxi_trips_sample.parquet", "end_taxi_trips_sample.parquet")
REGION = "us-east-1"
LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}

GLUE_SKIP_REASON = "needs Glue's JVM classes (GlueContext): run in the Glue 5 image (make test-glue)"

_endpoint_log_key = pytest.StashKey[Path]()
_configure_patch_key = pytest.StashKey[pytest.MonkeyPatch]()


def _apply_dummy_aws_environment(patch: pytest.MonkeyPatch) -> None:
    for name in list(os.environ):
        if is_scrubbed_aws_variable(name):
            patch.delenv(name)
    for name, value in dummy_aws_environment(REGION).items():
        patch.setenv(name, value)
    for name in ("NO_PROXY", "no_proxy"):
        patch.setenv(name, no_proxy_with_loopback(os.environ.get(name)))


def _raise_keyboard_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"received signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    # Applied here as well as in the aws_env fixture, because test modules
    # are imported at collection time, before any fixture runs, and some
    # build boto3 clients on import.
    patch = pytest.MonkeyPatch()
    _apply_dummy_aws_environment(patch)
    config.stash[_configure_patch_key] = patch

    # SIGTERM (from `make` when it is stopped, or from CI) would end pytest
    # without fixture teardown. As a KeyboardInterrupt it stops the session
    # normally, so the local endpoint is stopped too.
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def pytest_unconfigure(config: pytest.Config) -> None:
    patch = config.stash.get(_configure_patch_key, None)
    if patch is not None:
        patch.undo()
    _stop_spark_session()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    # `make test` sets the variable: a folder with no tests yet is no failure
    # there, while a plain pytest run keeps exit code 5.
    if exitstatus == pytest.ExitCode.NO_TESTS_COLLECTED and os.environ.get("TAXI_NO_TESTS_IS_SUCCESS"):
        session.exitstatus = pytest.ExitCode.OK
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_line("pytest collected no tests: exit code 5 counted as success")


def pytest_terminal_summary(
    terminalreporter: pytest.TerminalReporter, exitstatus: int, config: pytest.Config
) -> None:
    log_path = config.stash.get(_endpoint_log_key, None)
    failed = terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    if log_path is not None and failed:
        terminalreporter.write_sep("-", "local AWS endpoint")
        terminalreporter.write_line(f"MiniStack log of this session: {log_path}")


@pytest.fixture(scope="session", autouse=True)
def aws_env() -> Iterator[dict[str, str]]:
    """Dummy credentials and region, with profiles, tokens and endpoint overrides removed."""
    with pytest.MonkeyPatch.context() as patch:
        _apply_dummy_aws_environment(patch)
        yield dummy_aws_environment(REGION)


@pytest.fixture(scope="session")
def endpoint_url(aws_env: dict[str, str], pytestconfig: pytest.Config) -> Iterator[str]:
    """URL of the local AWS endpoint, also set as ``AWS_ENDPOINT_URL``.

    Starts MiniStack on 127.0.0.1 for the session, or reuses the endpoint
    that ``TAXI_TEST_ENDPOINT_URL`` names (for example one from
    ``make endpoint-start``).
    """
    reused_url = os.environ.get("TAXI_TEST_ENDPOINT_URL")
    with pytest.MonkeyPatch.context() as patch:
        if reused_url:
            _check_reused_endpoint(reused_url)
            patch.setenv("AWS_ENDPOINT_URL", reused_url)
            yield reused_url
            return

        endpoint = LocalEndpoint(region=REGION)
        try:
            endpoint.start()
        except LocalEndpointError as exc:
            pytest.fail(f"the local AWS endpoint did not start: {exc}", pytrace=False)
        pytestconfig.stash[_endpoint_log_key] = endpoint.log_path
        try:
            patch.setenv("AWS_ENDPOINT_URL", endpoint.url)
            yield endpoint.url
        finally:
            endpoint.stop()


def _check_reused_endpoint(url: str) -> None:
    host = urlsplit(url).hostname
    if host not in LOOPBACK_HOSTS:
        raise pytest.UsageError(
            f"TAXI_TEST_ENDPOINT_URL={url!r} is not on loopback: tests only run "
            "against a local endpoint (127.0.0.1, localhost or ::1)"
        )
    try:
        check_health(url.rstrip("/") + HEALTH_PATH)
    except LocalEndpointError as exc:
        pytest.fail(
            f"TAXI_TEST_ENDPOINT_URL={url} is not reachable ({exc}): start one with "
            "`make endpoint-start` or unset the variable",
            pytrace=False,
        )


@pytest.fixture(scope="session")
def aws_settings(endpoint_url: str):
    """``AwsSettings`` for the local endpoint, as the product's own code builds clients."""
    from taxi_pipeline.aws import AwsSettings

    return AwsSettings(region=REGION, endpoint_url=endpoint_url)


def _client(service: str, endpoint_url: str):
    config = Config(retries={"mode": "standard", "total_max_attempts": 3})
    return boto3.client(service, endpoint_url=endpoint_url, region_name=REGION, config=config)


@pytest.fixture(scope="session")
def dynamodb(endpoint_url: str):
    """Low-level DynamoDB client for the local endpoint."""
    return _client("dynamodb", endpoint_url)


@pytest.fixture(scope="session")
def sqs(endpoint_url: str):
    """Low-level SQS client for the local endpoint."""
    return _client("sqs", endpoint_url)


@pytest.fixture(scope="session")
def sns(endpoint_url: str):
    """Low-level SNS client for the local endpoint."""
    return _client("sns", endpoint_url)


@pytest.fixture(scope="session")
def kinesis(endpoint_url: str):
    """Low-level Kinesis client for the local endpoint."""
    return _client("kinesis", endpoint_url)


def _unique_name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def trip_table(dynamodb) -> Iterator[str]:
    """Name of a new, empty on-demand trip table keyed on ``trip_id``, deleted after the test."""
    name = _unique_name("trips")
    dynamodb.create_table(
        TableName=name,
        KeySchema=[{"AttributeName": "trip_id", "KeyType": "HASH"}],
        AttributeDefinitions=[{"AttributeName": "trip_id", "AttributeType": "S"}],
        BillingMode="PAY_PER_REQUEST",
    )
    dynamodb.get_waiter("table_exists").wait(TableName=name, WaiterConfig={"Delay": 1, "MaxAttempts": 30})
    yield name
    try:
        dynamodb.delete_table(TableName=name)
    except dynamodb.exceptions.ResourceNotFoundException:
        pass


@dataclass(frozen=True)
class QueueUrls:
    """URLs of a queue made by ``make_queue`` and of its dead-letter queue, if any."""

    url: str
    dead_letter_url: str | None = None


@pytest.fixture
def make_queue(sqs) -> Iterator[Callable[..., QueueUrls]]:
    """Factory for uniquely named SQS queues, all deleted after the test.

    ``make_queue(prefix="retry", dead_letter=True, max_receive_count=3,
    attributes={"VisibilityTimeout": "30"})`` returns ``QueueUrls``. With
    ``dead_letter`` a second queue is made and set as the target of the
    first one's redrive policy.
    """
    created: list[str] = []

    def make(
        prefix: str = "queue",
        *,
        dead_letter: bool = False,
        max_receive_count: int = 3,
        attributes: dict[str, str] | None = None,
    ) -> QueueUrls:
        if max_receive_count < 1:
            raise ValueError(f"max_receive_count must be at least 1, got {max_receive_count}")
        queue_attributes = dict(attributes or {})
        dead_letter_url = None

        if dead_letter:
            dead_letter_url = sqs.create_queue(QueueName=_unique_name(f"{prefix}-dlq"))["QueueUrl"]
            created.append(dead_letter_url)
            dead_letter_arn = sqs.get_queue_attributes(QueueUrl=dead_letter_url, AttributeNames=["QueueArn"])[
                "Attributes"
            ]["QueueArn"]
            queue_attributes["RedrivePolicy"] = json.dumps(
                {"deadLetterTargetArn": dead_letter_arn, "maxReceiveCount": max_receive_count}
            )

        url = sqs.create_queue(QueueName=_unique_name(prefix), Attributes=queue_attributes)["QueueUrl"]
        created.append(url)
        return QueueUrls(url=url, dead_letter_url=dead_letter_url)

    yield make

    for url in reversed(created):
        try:
            sqs.delete_queue(QueueUrl=url)
        except sqs.exceptions.QueueDoesNotExist:
            pass


# One SparkSession per pytest process, shared by the spark fixture and the
# GlueContext check of tests marked `glue`, and stopped when pytest ends.
_spark_session = None
_glue_context_error: str | None = None
_glue_context_checked = False


def _get_spark_session():
    global _spark_session
    if _spark_session is None:
        from pyspark.sql import SparkSession

        # Python workers must run this interpreter, which has the project
        # installed. By default Spark starts whatever python3 is on PATH.
        os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
        # Bound to loopback, and in UTC as Glue's workers are, so results do
        # not depend on the machine's network or time zone.
        _spark_session = (
            SparkSession.builder.master("local[2]")
            .appName("taxi-pipeline-tests")
            .config("spark.sql.shuffle.partitions", "4")
            .config("spark.ui.enabled", "false")
            .config("spark.ui.showConsoleProgress", "false")
            .config("spark.driver.host", "127.0.0.1")
            .config("spark.driver.bindAddress", "127.0.0.1")
            .config("spark.sql.session.timeZone", "UTC")
            .getOrCreate()
        )
    return _spark_session


def _stop_spark_session() -> None:
    global _spark_session
    if _spark_session is not None:
        _spark_session.stop()
        _spark_session = None


@pytest.fixture(scope="session")
def spark():
    """Local SparkSession (``local[2]``, 4 shuffle partitions, no UI), stopped when pytest ends."""
    try:
        import pyspark  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"pyspark is not installed: {exc}")
    yield _get_spark_session()
    _stop_spark_session()


def _check_glue_context() -> str | None:
    """Return why a GlueContext cannot be made here, or None when it can."""
    try:
        from awsglue.context import GlueContext
    except ImportError as exc:
        return f"awsglue is not importable: {exc}"
    try:
        GlueContext(_get_spark_session().sparkContext)
    except Exception as exc:  # py4j raises several exception types for missing JVM classes
        return f"{type(exc).__name__}: {exc}"
    return None


def pytest_runtest_setup(item: pytest.Item) -> None:
    global _glue_context_checked, _glue_context_error
    if item.get_closest_marker("glue") is None:
        return
    # The check starts Spark, so it runs once and only when a glue test runs.
    if not _glue_context_checked:
        _glue_context_error = _check_glue_context()
        _glue_context_checked = True
    if _glue_context_error is not None:
        pytest.skip(GLUE_SKIP_REASON)


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    """Folder of the San Francisco taxi-trip sample (start and end Parquet files).

    ``TAXI_SAMPLE_DIR`` points at another folder. Tests that use the sample
    are skipped when the folder or one of its two files is missing.
    """
    configured = os.environ.get("TAXI_SAMPLE_DIR")
    folder = Path(configured) if configured else DEFAULT_SAMPLE_DIR
    missing = [name for name in SAMPLE_FILES if not (folder / name).is_file()]
    if missing:
        pytest.skip(
            f"taxi-trip sample not found: looked in {folder} for {', '.join(missing)}; "
            "set TAXI_SAMPLE_DIR to the folder that holds "
            f"{SAMPLE_FILES[0]} and {SAMPLE_FILES[1]}"
        )
    return folder
