"""The replay job's driver: drain the retry queue in waves.

A wave is: receive up to ``wave_size`` messages in parallel Spark tasks,
keep them on the executors, parse and collapse them as DataFrame steps,
write each trip's events in one task, and settle every message. The driver
only ever keeps the counts of one wave, so its memory stays flat however
deep the queue is.

If an executor is lost, Spark may run a receive task again and receive other
messages; those that the lost task had received become visible again when
their visibility timeout ends. Nothing is lost, and the idempotent write
makes the repeat harmless.
"""

from __future__ import annotations

import logging
import time

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.replay import steps
from taxi_pipeline.replay.options import ReplayOptions
from taxi_pipeline.replay.queue import ReceiveQuota, check_queue_exists, dead_letter_queue_of, queue_counts
from taxi_pipeline.replay.report import RunReport, publish_metrics, write_report
from taxi_pipeline.replay.tasks import (
    QueueTarget,
    dead_letter_task,
    receive_task,
    release_task,
    write_task,
)

logger = logging.getLogger(__name__)

MESSAGE_COLUMNS = ("message_id", "receipt_handle", "received_at", "receive_count", "body")


class _CountsAccumulator:
    """An ``AccumulatorParam`` that adds dictionaries of counts."""

    def zero(self, value: dict) -> dict:
        return {}

    def addInPlace(self, first: dict, second: dict) -> dict:  # noqa: N802 (Spark's method name)
        for name, count in second.items():
            first[name] = first.get(name, 0) + count
        return first


def parallelism_of(spark: SparkSession, requested: int | None) -> int:
    return requested or max(1, spark.sparkContext.defaultParallelism)


def default_wave_size(partitions: int) -> int:
    """Return 2,500 messages per task, at least 10,000 and at most 100,000.

    Each wave pays a fixed Spark overhead of a few seconds, so waves grow with
    the cluster. The cap stays below the roughly 120,000 messages SQS lets be
    in flight on a standard queue.
    """
    return max(10_000, min(100_000, 2_500 * partitions))


def run_replay(spark: SparkSession, options: ReplayOptions, settings: AwsSettings | None = None) -> RunReport:
    """Drain the retry queue into the trip table and return the run report."""
    settings = settings or AwsSettings.from_env()
    report = RunReport(mode="dry_run" if options.dry_run else "replay", job_name=options.job_name)
    sqs = settings.client("sqs")

    check_queue_exists(sqs, options.queue_url, "retry queue")
    dead_letter_url = options.dead_letter_queue_url or dead_letter_queue_of(sqs, options.queue_url)
    if dead_letter_url is not None:
        check_queue_exists(sqs, dead_letter_url, "dead-letter queue")
    if dead_letter_url is None and not options.dry_run:
        raise ValueError(
            f"queue {options.queue_url} has no redrive policy and no dead_letter_queue_url was given: "
            "poison messages need a dead-letter queue"
        )
    partitions = parallelism_of(spark, options.parallelism)
    target = QueueTarget(
        queue_url=options.queue_url,
        dead_letter_queue_url=dead_letter_url,
        visibility_timeout=options.dry_run_visibility_timeout
        if options.dry_run
        else options.visibility_timeout,
        retry_delay_seconds=options.retry_delay_seconds,
    )
    logger.info(
        "replay starts: queue %s, table %s, dead-letter queue %s, %d partitions, waves of %d",
        options.queue_url,
        options.table_name,
        dead_letter_url,
        partitions,
        options.wave_size or default_wave_size(partitions),
    )

    wave_size = options.wave_size or default_wave_size(partitions)
    deadline = report.started_at + options.max_runtime_seconds
    empty_waves = 0
    while True:
        received_so_far = report.counts.get("messages_received", 0)
        if options.max_messages is not None and received_so_far >= options.max_messages:
            report.finish("message limit reached")
            break
        if time.time() >= deadline:
            report.finish("time limit reached")
            break

        wave_budget = wave_size
        if options.max_messages is not None:
            wave_budget = min(wave_budget, options.max_messages - received_so_far)
        received = _run_wave(spark, options, settings, target, partitions, wave_budget, deadline, report)

        if options.dry_run:
            report.finish("dry run sampled one wave" if received else "dry run found the queue empty")
            break
        if received == wave_budget:
            empty_waves = 0
            continue

        # A wave that received less than its budget found no more visible
        # messages, so the queue's counts decide whether another wave is worth it.
        counts = queue_counts(sqs, options.queue_url)
        waiting = counts["ApproximateNumberOfMessages"] + counts["ApproximateNumberOfMessagesDelayed"]
        if waiting == 0:
            report.counts["messages_in_flight_at_end"] = counts["ApproximateNumberOfMessagesNotVisible"]
            report.finish("queue drained")
            break
        if received:
            empty_waves = 0
            continue
        empty_waves += 1
        if empty_waves >= options.max_empty_waves:
            report.finish(f"no messages received in {empty_waves} waves while the queue reports {waiting}")
            break

    publish_report(report, options.report_path, options.metrics_namespace, settings)
    return report


def _run_wave(
    spark: SparkSession,
    options: ReplayOptions,
    settings: AwsSettings,
    target: QueueTarget,
    partitions: int,
    budget: int,
    deadline: float,
    report: RunReport,
) -> int:
    """Run one wave; return the number of messages it received."""
    wave_started = time.time()
    context = spark.sparkContext
    counters = context.accumulator({}, _CountsAccumulator())
    quota = ReceiveQuota(
        max_messages=budget,
        wait_time_seconds=options.wait_time_seconds,
        visibility_timeout=target.visibility_timeout,
        threads=options.receive_threads,
        deadline=deadline,
    )

    # Receiving is a side effect, so the received messages are persisted and
    # counted once; later steps read the persisted blocks. Each task gets an
    # equal share of the wave's budget.
    received_rdd = context.parallelize(range(partitions), partitions).mapPartitionsWithIndex(
        receive_task(settings, options.queue_url, quota, partitions, counters)
    )
    messages = spark.createDataFrame(received_rdd, steps.MESSAGE_SCHEMA).persist(StorageLevel.MEMORY_AND_DISK)
    try:
        received = messages.count()
        receive_seconds = time.time() - wave_started
        report.counts.update(counters.value)
        report.counts["messages_received"] += received
        if received == 0:
            return 0
        report.waves += 1

        parsed = steps.parse_messages(messages).persist(StorageLevel.MEMORY_AND_DISK)
        try:
            if options.dry_run:
                _dry_run_wave(parsed, settings, target, report)
            else:
                _settle_wave(parsed, options, settings, target, partitions, report)
        finally:
            parsed.unpersist()
    finally:
        messages.unpersist()

    logger.info(
        "wave %d: %d messages in %.1f s (receiving %.1f s); outcomes so far %s",
        report.waves,
        received,
        time.time() - wave_started,
        receive_seconds,
        dict(report.outcomes),
    )
    return received


def _settle_wave(
    parsed: DataFrame,
    options: ReplayOptions,
    settings: AwsSettings,
    target: QueueTarget,
    partitions: int,
    report: RunReport,
) -> None:
    invalid = steps.invalid_events(parsed).select(
        "message_id", "receipt_handle", "body", "receive_count", "trip_id", "reason", "detail"
    )
    for partial in invalid.rdd.mapPartitions(dead_letter_task(settings, target)).collect():
        report.add(partial)

    events = steps.collapse_events(steps.valid_events(parsed), MESSAGE_COLUMNS)
    ordered = steps.order_for_writes(events, partitions)
    writer = write_task(settings, options.table_name, options.write_threads, target)
    for partial in ordered.rdd.mapPartitions(writer).collect():
        report.add(partial)


def _dry_run_wave(parsed: DataFrame, settings: AwsSettings, target: QueueTarget, report: RunReport) -> None:
    valid = steps.valid_events(parsed)
    report.outcomes["would_apply"] += valid.count()
    report.counts["distinct_events"] += steps.collapse_events(valid).count()
    report.counts["trips"] += valid.select("trip_id").distinct().count()
    for row in steps.invalid_events(parsed).groupBy("reason").count().collect():
        report.outcomes["would_dead_letter"] += row["count"]
        report.reasons[row["reason"]] += row["count"]
    parsed.select("receipt_handle").foreachPartition(release_task(settings, target.queue_url))


def publish_report(
    report: RunReport, report_path: str | None, namespace: str | None, settings: AwsSettings
) -> None:
    report.log()
    if report_path:
        logger.info("run report written to %s", write_report(report, report_path, settings))
    if namespace:
        publish_metrics(report, namespace, settings)
