"""The end-to-end demo: deploy the pipeline locally, send real traffic with faults, replay, verify.

Stages, each reported with its elapsed time:

1. start the fault proxy and the local endpoint (MiniStack). MiniStack is
   started with ``AWS_ENDPOINT_URL`` set to the proxy, so the deployed
   functions' AWS calls go through it and a share of their trip writes fail;
2. package the functions and the job, and deploy ``infra/template.yaml``;
3. subscribe a check queue to the invalid-trips topic;
4. produce the trips' start and end events, with duplicates, ends before
   starts and one corrupted copy per kind of invalid event;
5. wait until the functions have consumed both streams;
6. switch the faults off and run the replay job on a local SparkSession;
7. verify the table and the queues against the source rows.

Everything the demo starts is stopped at the end, also after an error or
Ctrl-C. With ``keep_running``, the endpoint stays up for inspection until Ctrl-C.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from botocore.exceptions import ClientError

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.tooling.deploy import deploy_stack
from taxi_pipeline.tooling.faults import DEFAULT_FAILURE_RATE, FaultInjectingProxy, FaultStats
from taxi_pipeline.tooling.local_endpoint import LocalEndpoint
from taxi_pipeline.tooling.packaging import build_artifacts
from taxi_pipeline.tooling.producer import (
    ROLE_CORRUPTED,
    ProduceResult,
    plan_traffic,
    send_traffic,
)
from taxi_pipeline.tooling.sample import (
    REPO_ROOT,
    SAMPLE_DIR_VARIABLE,
    SampleNotFoundError,
    TripSample,
    read_sample,
    resolve_sample_dir,
)
from taxi_pipeline.tooling.synthetic import generate_trips
from taxi_pipeline.tooling.verify import (
    CheckResult,
    ExpectedRejection,
    VerificationReport,
    VerifyTargets,
    queue_depth,
    verify_run,
)

logger = logging.getLogger(__name__)

DEFAULT_STACK_NAME = "taxi-pipeline"
DEFAULT_REGION = "us-east-1"
DEFAULT_SEED = 7
TEMPLATE_PATH = REPO_ROOT / "infra" / "template.yaml"
DEMO_BUILD_DIR = REPO_ROOT / "build"
CHECK_QUEUE_SUFFIX = "-invalid-trips-check"

# The demo stack is thrown away with the endpoint, so its table needs no
# deletion protection.
DEMO_STACK_PARAMETERS = {"TableDeletionProtectionEnabled": "false"}

# Consumption is over when every count has reached its target and none has
# changed for SETTLE_SECONDS, so that late extras (a batch delivered again, a
# repeated notification) still reach the checks.
POLL_SECONDS = 0.5
SETTLE_SECONDS = 3.0
# Counts that stop changing for this long without reaching their targets mean
# something is lost; the demo then moves on and verification shows what.
STALL_SECONDS = 30.0
DEFAULT_CONSUME_TIMEOUT_SECONDS = 150.0

REPLAY_MAX_RUNTIME_SECONDS = 120.0
# The replay's last receive finds the queue empty; a short long-poll keeps
# that final wait short. The queue is local, so nothing arrives late.
REPLAY_WAIT_TIME_SECONDS = 1

# Dummy credentials and no metadata lookups: the demo talks to 127.0.0.1 only.
LOCAL_AWS_ENVIRONMENT = {
    "AWS_ACCESS_KEY_ID": "test",
    "AWS_SECRET_ACCESS_KEY": "test",
    "AWS_EC2_METADATA_DISABLED": "true",
    "AWS_CONFIG_FILE": os.devnull,
    "AWS_SHARED_CREDENTIALS_FILE": os.devnull,
    "SPARK_LOCAL_IP": "127.0.0.1",
}
_REMOVED_AWS_VARIABLES = (
    "AWS_PROFILE",
    "AWS_DEFAULT_PROFILE",
    "AWS_SESSION_TOKEN",
    "AWS_SECURITY_TOKEN",
)


class DemoError(RuntimeError):
    """A stage of the demo failed; the message names the stage and the cause."""


@dataclass(frozen=True)
class DemoOptions:
    """Settings of one demo run."""

    data_dir: Path | None = None
    synthetic: bool = False
    synthetic_trips: int = 200
    failure_rate: float = DEFAULT_FAILURE_RATE
    limit: int | None = None
    seed: int = DEFAULT_SEED
    keep_running: bool = False
    consume_timeout_seconds: float = DEFAULT_CONSUME_TIMEOUT_SECONDS
    stack_name: str = DEFAULT_STACK_NAME
    region: str = DEFAULT_REGION

    def __post_init__(self) -> None:
        if not 0.0 <= self.failure_rate <= 1.0:
            raise ValueError(f"failure rate {self.failure_rate!r} is invalid: use a share from 0 to 1")
        if self.limit is not None and self.limit < 1:
            raise ValueError(f"limit {self.limit} is invalid: use a number of trips of at least 1")
        if self.consume_timeout_seconds <= 0:
            raise ValueError(
                f"consume timeout {self.consume_timeout_seconds!r} is invalid: "
                "use a positive number of seconds"
            )


# --- Stack resources -----------------------------------------------------------------


@dataclass(frozen=True)
class PipelineResources:
    """The names and URLs of a deployed stack, from its outputs."""

    start_stream: str
    end_stream: str
    table_name: str
    retry_queue_url: str
    dead_letter_queue_url: str | None
    stream_records_failed_queue_url: str | None
    invalid_topic_arn: str

    @classmethod
    def from_outputs(cls, outputs: Mapping[str, str]) -> PipelineResources:
        """Read the resources from stack outputs; raise ``DemoError`` naming any missing output."""
        required = (
            "StartTripStreamName",
            "EndTripStreamName",
            "TripTableName",
            "RetryQueueUrl",
            "InvalidTripsTopicArn",
        )
        missing = [name for name in required if not outputs.get(name)]
        if missing:
            raise DemoError(
                f"stack outputs {', '.join(missing)} are missing: deploy infra/template.yaml "
                "of this checkout (taxi-pipeline deploy)"
            )
        return cls(
            start_stream=outputs["StartTripStreamName"],
            end_stream=outputs["EndTripStreamName"],
            table_name=outputs["TripTableName"],
            retry_queue_url=outputs["RetryQueueUrl"],
            dead_letter_queue_url=outputs.get("DeadLetterQueueUrl"),
            stream_records_failed_queue_url=outputs.get("StreamRecordsFailedQueueUrl"),
            invalid_topic_arn=outputs["InvalidTripsTopicArn"],
        )

    @classmethod
    def from_stack(cls, cloudformation: Any, stack_name: str) -> PipelineResources:
        """Read the resources of a deployed stack by its name."""
        try:
            stacks = cloudformation.describe_stacks(StackName=stack_name)["Stacks"]
        except ClientError as exc:
            raise DemoError(
                f"stack {stack_name} not found or not readable: {exc}. Deploy it with "
                "`taxi-pipeline deploy`, or pass --stack-name and --endpoint-url of the deployed stack"
            ) from exc
        outputs = {entry["OutputKey"]: entry["OutputValue"] for entry in stacks[0].get("Outputs", [])}
        return cls.from_outputs(outputs)

    def verify_targets(self, check_queue_url: str | None) -> VerifyTargets:
        """Return the resources that verification reads."""
        return VerifyTargets(
            table_name=self.table_name,
            retry_queue_url=self.retry_queue_url,
            dead_letter_queue_url=self.dead_letter_queue_url,
            stream_records_failed_queue_url=self.stream_records_failed_queue_url,
            check_queue_url=check_queue_url,
        )


def subscribe_check_queue(sqs: Any, sns: Any, topic_arn: str, queue_name: str) -> str:
    """Create a queue subscribed to the invalid-trips topic, with raw delivery; return its URL.

    Raw delivery keeps the function's message attributes (``reason`` among
    them) as SQS message attributes. The queue policy lets only this topic
    send to the queue. Calling it again reuses the queue and the subscription.
    """
    queue_url = sqs.create_queue(QueueName=queue_name, Attributes={"SqsManagedSseEnabled": "true"})[
        "QueueUrl"
    ]
    queue_arn = sqs.get_queue_attributes(QueueUrl=queue_url, AttributeNames=["QueueArn"])["Attributes"][
        "QueueArn"
    ]
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "InvalidTripsTopicSends",
                "Effect": "Allow",
                "Principal": {"Service": "sns.amazonaws.com"},
                "Action": "sqs:SendMessage",
                "Resource": queue_arn,
                "Condition": {"ArnEquals": {"aws:SourceArn": topic_arn}},
            }
        ],
    }
    sqs.set_queue_attributes(QueueUrl=queue_url, Attributes={"Policy": json.dumps(policy)})
    sns.subscribe(
        TopicArn=topic_arn,
        Protocol="sqs",
        Endpoint=queue_arn,
        Attributes={"RawMessageDelivery": "true"},
        ReturnSubscriptionArn=True,
    )
    logger.info("queue %s subscribed to %s", queue_name, topic_arn)
    return queue_url


def load_trips(data_dir: Path | None, synthetic: bool, synthetic_trips: int, seed: int) -> TripSample:
    """Read the trip rows from ``data_dir`` (or the default folder), or generate synthetic ones.

    When no folder is named (no ``data_dir``, no ``TAXI_SAMPLE_DIR``) and
    the default folder has no trip files, synthetic trips are generated, and
    their ``source`` names the reason. A named folder without trip files raises
    ``SampleNotFoundError``.
    """
    if synthetic:
        return generate_trips(synthetic_trips, seed)
    try:
        return read_sample(data_dir)
    except SampleNotFoundError:
        if data_dir or os.environ.get(SAMPLE_DIR_VARIABLE):
            raise
    sample = generate_trips(synthetic_trips, seed)
    reason = f"no trip files in {resolve_sample_dir(None)}"
    logger.warning("%s: generating %d synthetic trips", reason, synthetic_trips)
    return replace(sample, source=f"{sample.source}; {reason}")


def expected_rejections(result: ProduceResult) -> list[ExpectedRejection]:
    """Return the rejection each corrupted record that was sent must get."""
    return [
        ExpectedRejection(
            reason=record.expected_reason or "",
            trip_id=record.trip_id,
            corruption=record.corruption,
            stream=record.stream,
            sequence_number=record.sequence_number,
        )
        for record in result.records
        if record.role == ROLE_CORRUPTED
    ]


# --- Stage reporting -----------------------------------------------------------------


class StageClock:
    """Report each stage with the seconds since the demo started and the stage's own duration."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self._report = report
        self.started = time.monotonic()
        self.durations: dict[str, float] = {}

    def elapsed(self) -> float:
        """Return the seconds since the demo started."""
        return time.monotonic() - self.started

    def note(self, text: str) -> None:
        """Report one line, prefixed with the elapsed time."""
        self._report(f"[{self.elapsed():6.1f} s] {text}")

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Report the start and the end of a stage; a failure names the stage."""
        self.note(f"{name} ...")
        started = time.monotonic()
        try:
            yield
        except (KeyboardInterrupt, DemoError):
            raise
        except Exception as exc:
            raise DemoError(f"stage '{name}' failed: {exc}") from exc
        self.durations[name] = time.monotonic() - started
        self.note(f"{name}: done in {self.durations[name]:.1f} s")


# --- Waiting for the functions -------------------------------------------------------


@dataclass(frozen=True)
class ConsumptionTargets:
    """The counts that mean both streams are consumed, when the functions work as specified."""

    table_items: int
    retry_messages: int
    invalid_notifications: int


@dataclass
class ConsumptionState:
    """Counts observed while waiting, and how the wait ended."""

    table_items: int = 0
    retry_messages: int = 0
    invalid_notifications: int = 0
    proxy_requests: int = 0
    reached_targets: bool = False
    stop_reason: str = ""

    def key(self) -> tuple[int, int, int, int]:
        return (
            self.table_items,
            self.retry_messages,
            self.invalid_notifications,
            self.proxy_requests,
        )


def consumption_targets(result: ProduceResult, proxy: FaultInjectingProxy) -> ConsumptionTargets:
    """Work out the counts to wait for from what was sent and which events the proxy fails.

    A trip is in the table once any of its valid events was written, and
    every valid record of a failing event (duplicates too) goes to the retry
    queue.
    """
    sent = result.valid_event_keys()
    failing = {key for key in sent if proxy.fails(*key)}
    written_trips = {trip_id for trip_id, kind in sent if (trip_id, kind) not in failing}
    return ConsumptionTargets(
        table_items=len(written_trips),
        retry_messages=sum(count for key, count in sent.items() if key in failing),
        invalid_notifications=len(result.corrupted()),
    )


def count_items(dynamodb: Any, table_name: str) -> int:
    """Count the table's items with a paginated ``Scan``."""
    total = 0
    request: dict[str, Any] = {"TableName": table_name, "Select": "COUNT"}
    while True:
        response = dynamodb.scan(**request)
        total += response["Count"]
        if "LastEvaluatedKey" not in response:
            return total
        request["ExclusiveStartKey"] = response["LastEvaluatedKey"]


def wait_for_consumption(
    dynamodb: Any,
    sqs: Any,
    resources: PipelineResources,
    check_queue_url: str,
    targets: ConsumptionTargets,
    proxy: FaultInjectingProxy,
    timeout_seconds: float,
    progress: Callable[[ConsumptionState], None] | None = None,
) -> ConsumptionState:
    """Poll the table, the retry queue and the check queue until the functions are done.

    Done means every count reached its target and nothing changed for
    ``SETTLE_SECONDS``. The wait also ends when nothing changed for
    ``STALL_SECONDS`` or at ``timeout_seconds``; verification then shows
    what is missing.
    """
    deadline = time.monotonic() + timeout_seconds
    last_key: tuple[int, ...] | None = None
    last_change = time.monotonic()
    last_progress = 0.0
    state = ConsumptionState()

    while True:
        state = ConsumptionState(
            table_items=count_items(dynamodb, resources.table_name),
            retry_messages=queue_depth(sqs, resources.retry_queue_url),
            invalid_notifications=queue_depth(sqs, check_queue_url),
            proxy_requests=proxy.stats().requests,
        )
        now = time.monotonic()
        if state.key() != last_key:
            last_key, last_change = state.key(), now
        state.reached_targets = (
            state.table_items >= targets.table_items
            and state.retry_messages >= targets.retry_messages
            and state.invalid_notifications >= targets.invalid_notifications
        )
        quiet = now - last_change

        if state.reached_targets and quiet >= SETTLE_SECONDS:
            state.stop_reason = "all counts reached their targets"
            return state
        if quiet >= STALL_SECONDS:
            state.stop_reason = f"counts unchanged for {STALL_SECONDS:.0f} s below their targets"
            return state
        if now >= deadline:
            state.stop_reason = f"timed out after {timeout_seconds:.0f} s"
            return state
        if progress is not None and now - last_progress >= 5.0:
            progress(state)
            last_progress = now
        time.sleep(POLL_SECONDS)


# --- Replay --------------------------------------------------------------------------


def start_local_spark(cores: int = 2) -> Any:
    """Start a local SparkSession bound to 127.0.0.1, with this interpreter for Python workers."""
    from pyspark.sql import SparkSession

    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (
        SparkSession.builder.master(f"local[{cores}]")
        .appName("taxi-pipeline-demo-replay")
        .config("spark.ui.enabled", "false")
        .config("spark.ui.showConsoleProgress", "false")
        .config("spark.driver.bindAddress", "127.0.0.1")
        .config("spark.driver.host", "127.0.0.1")
        .config("spark.sql.shuffle.partitions", str(cores * 2))
        .config("spark.python.worker.reuse", "true")
        .getOrCreate()
    )


def run_replay_job(spark: Any, resources: PipelineResources, settings: AwsSettings) -> dict[str, Any]:
    """Drain the retry queue with the replay job and return its report as a dict."""
    from taxi_pipeline.replay import ReplayOptions, run_replay

    options = ReplayOptions(
        queue_url=resources.retry_queue_url,
        table_name=resources.table_name,
        dead_letter_queue_url=resources.dead_letter_queue_url,
        max_runtime_seconds=REPLAY_MAX_RUNTIME_SECONDS,
        wait_time_seconds=REPLAY_WAIT_TIME_SECONDS,
        parallelism=2,
    )
    report = run_replay(spark, options, settings=settings)
    return report.to_dict()


# --- Summary -------------------------------------------------------------------------


@dataclass
class DemoResult:
    """The counts and checks of one demo run."""

    source: str
    synthetic: bool
    trips: int
    sent: dict[str, int]
    stream_faults: dict[str, Any]
    retry_messages_before_replay: int
    invalid_notifications: int
    consumption: str
    replay: dict[str, Any]
    verification: VerificationReport
    wall_seconds: float
    endpoint_url: str = ""
    stages: dict[str, float] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        """True when every check passed."""
        return self.verification.passed

    def summary_rows(self) -> list[tuple[str, str]]:
        """Return the summary as (label, value) rows."""
        sent = self.sent
        outcomes = self.stream_faults.get("update_item_outcomes", {})
        replayed = self.replay.get("outcomes", {})
        detected_duplicates = outcomes.get("ConditionalCheckFailedException", 0) + replayed.get(
            "duplicate", 0
        )
        checks_run = len(self.verification.checks) - self.verification.count("SKIP")
        return [
            ("data", f"{self.source} ({self.trips} trips)"),
            (
                "events sent",
                f"{sent['total']} ({sent['event']} events, {sent['duplicate']} sent twice, "
                f"{sent['corrupted']} corrupted; {sent['ends_first_trips']} trips end first)",
            ),
            ("written directly", f"{outcomes.get('ok', 0)} trip writes by the stream functions"),
            (
                "failed, then replayed",
                f"{self.stream_faults.get('faulted_events', 0)} events failed "
                f"({self.stream_faults.get('faults_injected', 0)} injected faults), "
                f"{self.retry_messages_before_replay} retry messages; replay applied "
                f"{replayed.get('applied', 0)}, duplicate {replayed.get('duplicate', 0)}, "
                f"dead-lettered {replayed.get('dead_lettered', 0)}",
            ),
            (
                "invalid",
                f"{sent['corrupted']} corrupted records sent, "
                f"{self.invalid_notifications} notifications on the check queue",
            ),
            (
                "duplicates",
                f"{sent['duplicate']} sent twice; {detected_duplicates} writes changed nothing",
            ),
            ("checks passed", f"{self.verification.count('PASS')} of {checks_run}"),
            ("wall time", f"{self.wall_seconds:.1f} s"),
            ("result", "PASS" if self.passed else "FAIL"),
        ]

    def render_text(self) -> str:
        """Return the summary table and the verification lines."""
        rows = self.summary_rows()
        width = max(len(label) for label, _ in rows)
        lines = ["", "Summary", "-------"]
        lines += [f"{label:<{width}}  {value}" for label, value in rows]
        lines += ["", "Checks", "------", self.verification.render_text()]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """Return the result as plain JSON-ready values."""
        return {
            "passed": self.passed,
            "source": self.source,
            "synthetic": self.synthetic,
            "trips": self.trips,
            "sent": self.sent,
            "stream_faults": self.stream_faults,
            "retry_messages_before_replay": self.retry_messages_before_replay,
            "invalid_notifications": self.invalid_notifications,
            "consumption": self.consumption,
            "replay": {key: self.replay.get(key) for key in ("outcomes", "counts", "stop_reason", "waves")},
            "verification": self.verification.to_dict(),
            "wall_seconds": round(self.wall_seconds, 1),
            "stages": {name: round(seconds, 1) for name, seconds in self.stages.items()},
        }


def replay_checks(
    targets: ConsumptionTargets, retry_messages: int, replay: Mapping[str, Any], failure_rate: float
) -> list[CheckResult]:
    """Check that the failed writes really went through the retry queue and the replay."""
    outcomes = replay.get("outcomes", {})
    settled = outcomes.get("applied", 0) + outcomes.get("duplicate", 0) + outcomes.get("stale", 0)
    received = replay.get("counts", {}).get("messages_received", 0)
    return [
        CheckResult(
            name="every failed write reached the retry queue",
            passed=retry_messages == targets.retry_messages,
            summary=f"{retry_messages} retry messages, {targets.retry_messages} expected "
            f"from the events the proxy failed (failure rate {failure_rate:.2f})",
            mismatches=abs(retry_messages - targets.retry_messages),
        ),
        CheckResult(
            name="the replay wrote every retry message",
            passed=received == retry_messages and settled == received and not outcomes.get("dead_lettered"),
            summary=f"{received} received, {settled} applied or already applied, "
            f"{outcomes.get('dead_lettered', 0)} dead-lettered, "
            f"{outcomes.get('retry_later', 0)} left for later",
            mismatches=abs(received - settled),
        ),
    ]


# --- The run -------------------------------------------------------------------------


@contextlib.contextmanager
def local_aws_environment(region: str) -> Iterator[None]:
    """Set dummy credentials and the Region in ``os.environ``; restore the environment afterwards.

    Once ``run_demo`` adds ``AWS_ENDPOINT_URL``, clients built without an
    explicit endpoint, Spark's Python workers among them, reach the local
    endpoint only.
    """
    saved = dict(os.environ)
    try:
        for name in _REMOVED_AWS_VARIABLES:
            os.environ.pop(name, None)
        os.environ.update(LOCAL_AWS_ENVIRONMENT)
        os.environ["AWS_DEFAULT_REGION"] = region
        os.environ["AWS_REGION"] = region
        for name in ("NO_PROXY", "no_proxy"):
            os.environ[name] = ",".join(filter(None, [os.environ.get(name), "127.0.0.1", "localhost"]))
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


def start_endpoint_behind_proxy(
    options: DemoOptions, cleanup: contextlib.ExitStack
) -> tuple[FaultInjectingProxy, LocalEndpoint]:
    """Start the fault proxy, then MiniStack with the proxy as its functions' endpoint.

    The proxy needs MiniStack's URL and MiniStack needs the proxy's, so the
    proxy starts first and learns its upstream once MiniStack runs. Both are
    stopped by ``cleanup``. ``AWS_ENDPOINT_URL`` of this process is set to
    MiniStack itself.
    """
    proxy = FaultInjectingProxy(failure_rate=options.failure_rate, salt=str(options.seed)).start()
    cleanup.callback(proxy.stop)
    endpoint = LocalEndpoint(extra_env={"AWS_ENDPOINT_URL": proxy.url}, region=options.region)
    endpoint.start()
    cleanup.callback(endpoint.stop)
    proxy.upstream_url = endpoint.url
    os.environ["AWS_ENDPOINT_URL"] = endpoint.url
    return proxy, endpoint


def package_and_deploy(stack_name: str, settings: AwsSettings) -> PipelineResources:
    """Build the artifacts into ``build/`` and deploy the template; return the stack's resources."""
    build_artifacts(DEMO_BUILD_DIR)
    outputs = deploy_stack(
        stack_name,
        TEMPLATE_PATH,
        DEMO_BUILD_DIR,
        None,
        DEMO_STACK_PARAMETERS,
        settings,
        poll_seconds=0.5,
    )
    return PipelineResources.from_outputs(outputs)


def describe_progress(state: ConsumptionState, targets: ConsumptionTargets) -> str:
    """Describe the counts observed so far against their targets."""
    return (
        f"table {state.table_items}/{targets.table_items} trips with a write that got through "
        "(the others arrive by replay), "
        f"retry queue {state.retry_messages}/{targets.retry_messages} messages, "
        f"invalid topic {state.invalid_notifications}/{targets.invalid_notifications} notifications"
    )


def run_demo(
    options: DemoOptions,
    report: Callable[[str], None] | None = None,
    sample: TripSample | None = None,
) -> DemoResult:
    """Run the whole demo and return its result; stop everything it started before returning.

    ``report`` receives one progress line per stage and, at the end, the
    summary (the CLI passes ``print``); by default the lines are logged.
    With ``keep_running``, the summary is reported and the endpoint kept
    until Ctrl-C. ``sample`` replaces the trips that ``options`` select, and
    is then used without a limit.
    """
    report = report or logger.info
    clock = StageClock(report)

    with contextlib.ExitStack() as cleanup:
        cleanup.enter_context(local_aws_environment(options.region))

        if sample is None:
            with clock.stage("load trips"):
                sample = load_trips(
                    options.data_dir, options.synthetic, options.synthetic_trips, options.seed
                )
                sample = sample.limited(options.limit, options.seed)
        if sample.synthetic:
            clock.note(f"SYNTHETIC RUN: {sample.source}")
        else:
            clock.note(f"real trips from {sample.source}: {len(sample.trip_ids())} trips")

        with clock.stage("start the fault proxy and the local endpoint"):
            proxy, endpoint = start_endpoint_behind_proxy(options, cleanup)
        clock.note(
            f"endpoint {endpoint.url}, fault proxy {proxy.url} (failure rate {options.failure_rate:.2f})"
        )

        settings = AwsSettings(region=options.region, endpoint_url=endpoint.url)
        sqs, sns = settings.client("sqs"), settings.client("sns")
        dynamodb, kinesis = settings.client("dynamodb"), settings.client("kinesis")

        with clock.stage("package and deploy"):
            resources = package_and_deploy(options.stack_name, settings)

        with clock.stage("subscribe a check queue to the invalid-trips topic"):
            check_queue_url = subscribe_check_queue(
                sqs, sns, resources.invalid_topic_arn, options.stack_name + CHECK_QUEUE_SUFFIX
            )

        # Spark's start-up overlaps with producing and waiting, which mostly wait on I/O.
        spark_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spark-start")
        spark_future: Future = spark_pool.submit(start_local_spark)
        cleanup.callback(_stop_spark, spark_future, spark_pool)

        with clock.stage("produce events"):
            plan = plan_traffic(sample, options.seed)
            produced = send_traffic(
                kinesis, plan, start_stream=resources.start_stream, end_stream=resources.end_stream
            )
        counts = produced.counts()
        clock.note(
            f"sent {counts['total']} records: {counts['event']} events, "
            f"{counts['duplicate']} sent twice, {counts['corrupted']} corrupted, "
            f"{counts['ends_first_trips']} trips with the end first"
        )

        targets = consumption_targets(produced, proxy)
        with clock.stage("wait for the stream functions"):
            consumption = wait_for_consumption(
                dynamodb,
                sqs,
                resources,
                check_queue_url,
                targets,
                proxy,
                options.consume_timeout_seconds,
                progress=lambda state: clock.note("  " + describe_progress(state, targets)),
            )
        clock.note(
            f"consumed: {consumption.stop_reason}; table {consumption.table_items} trips, "
            f"retry queue {consumption.retry_messages}, invalid {consumption.invalid_notifications}"
        )

        stream_faults = proxy.stats()
        proxy.disable()
        proxy.reset_stats()

        with clock.stage("replay the retry queue (faults off)"):
            spark = spark_future.result()
            replay = run_replay_job(
                spark, resources, AwsSettings(region=options.region, endpoint_url=proxy.url)
            )
        clock.note(_describe_replay(replay))

        with clock.stage("verify"):
            verification = verify_run(
                dynamodb,
                sqs,
                resources.verify_targets(check_queue_url),
                sample.start_rows,
                sample.end_rows,
                expected_rejections(produced),
            )
            verification.checks.extend(
                replay_checks(targets, consumption.retry_messages, replay, options.failure_rate)
            )

        result = DemoResult(
            source=sample.source,
            synthetic=sample.synthetic,
            trips=len(sample.trip_ids()),
            sent=counts,
            stream_faults=_fault_summary(stream_faults),
            retry_messages_before_replay=consumption.retry_messages,
            invalid_notifications=consumption.invalid_notifications,
            consumption=consumption.stop_reason,
            replay=replay,
            verification=verification,
            wall_seconds=clock.elapsed(),
            endpoint_url=endpoint.url,
            stages=dict(clock.durations),
        )
        report(result.render_text())

        if options.keep_running:
            _wait_for_interrupt(clock, endpoint.url, resources)
        return result


def _fault_summary(stats: FaultStats) -> dict[str, Any]:
    summary = stats.to_dict()
    summary["faulted_events"] = len(stats.faulted_events)
    return summary


def _describe_replay(replay: Mapping[str, Any]) -> str:
    outcomes = ", ".join(f"{name} {count}" for name, count in replay.get("outcomes", {}).items()) or "nothing"
    received = replay.get("counts", {}).get("messages_received", 0)
    return f"replay: {received} messages received; {outcomes}; {replay.get('stop_reason', '')}"


def _stop_spark(future: Future, pool: ThreadPoolExecutor) -> None:
    """Stop the SparkSession once its start has finished, even when the demo failed."""
    try:
        spark = future.result(timeout=120)
    except Exception:  # noqa: BLE001 - a failed start has nothing to stop; the error was reported where it was used
        logger.debug("Spark did not start, nothing to stop", exc_info=True)
    else:
        spark.stop()
    finally:
        pool.shutdown(wait=False)


def _wait_for_interrupt(clock: StageClock, endpoint_url: str, resources: PipelineResources) -> None:
    clock.note(
        f"keeping the endpoint running at {endpoint_url} (table {resources.table_name}); "
        "press Ctrl-C to stop it"
    )
    with contextlib.suppress(KeyboardInterrupt):
        while True:
            time.sleep(3600)
