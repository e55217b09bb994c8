"""Backfill: apply start and end events from files with the replay job's trip writes."""

from __future__ import annotations

from pathlib import Path

from pyspark import StorageLevel
from pyspark.sql import DataFrame, SparkSession
from pyspark.sql import functions as F

from taxi_pipeline.aws import AwsSettings
from taxi_pipeline.replay import steps
from taxi_pipeline.replay.job import parallelism_of, publish_report
from taxi_pipeline.replay.options import BackfillOptions
from taxi_pipeline.replay.report import RunReport
from taxi_pipeline.replay.tasks import write_task

FILE_PATTERNS = {"parquet": "*.parquet", "json": "*.{json,jsonl}", "csv": "*.csv"}
_FORMAT_HINT = (
    "set the format to parquet, json or csv (--source_format in the job, --format in taxi-pipeline)"
)
_SUFFIX_FORMATS = ((".parquet", "parquet"), (".jsonl", "json"), (".json", "json"), (".csv", "csv"))


def read_source(spark: SparkSession, source: str, source_format: str = "auto") -> tuple[DataFrame, str]:
    """Read backfill files into a DataFrame; return it and the format used.

    A folder is read recursively, and only the files whose names end in the
    format's suffix (``.parquet``, ``.json`` or ``.jsonl``, ``.csv``), so a
    README or a marker file beside the data is skipped. JSON Lines are read as
    text, one raw event per line, so they go through exactly the parsing of a
    stream record. CSV columns are read as strings, each file by its own
    header, and Parquet columns with their own types; start and end files in
    one folder merge into one schema by column name.
    """
    fmt = source_format if source_format != "auto" else guess_format(source)
    reader = spark.read.option("recursiveFileLookup", "true").option("pathGlobFilter", FILE_PATTERNS[fmt])
    if fmt == "parquet":
        frame = reader.option("mergeSchema", "true").parquet(source)
    elif fmt == "csv":
        frame = _read_csv_files(spark, reader, source)
    else:
        frame = reader.text(source).withColumnRenamed("value", "body")
    return frame, fmt


def _read_csv_files(spark: SparkSession, reader, source: str) -> DataFrame:
    """Read every CSV file by its own header and merge them by column name.

    Spark's CSV reader applies the first file's header to every file by
    position, which would put an end file's values under a start file's
    column names.
    """
    # NOTE: one read per file; a source of many thousands of CSV files plans slowly.
    paths = [row["path"] for row in reader.format("binaryFile").load(source).select("path").collect()]
    if not paths:
        raise ValueError(f"no .csv files found under {source!r}")
    frames = [
        spark.read.option("header", "true").option("inferSchema", "false").csv(path) for path in sorted(paths)
    ]
    merged = frames[0]
    for frame in frames[1:]:
        merged = merged.unionByName(frame, allowMissingColumns=True)
    return merged


def guess_format(source: str) -> str:
    """Tell a source's format from its name, or from the files in a local folder."""
    lowered = source.rstrip("/").lower()
    for suffix, fmt in _SUFFIX_FORMATS:
        if lowered.endswith(suffix):
            return fmt

    folder = Path(source)
    if "://" not in source and not folder.exists():
        raise ValueError(f"backfill source {source!r} does not exist")
    if "://" not in source and folder.is_dir():
        found = {
            fmt
            for path in folder.rglob("*")
            for suffix, fmt in _SUFFIX_FORMATS
            if path.is_file() and path.name.lower().endswith(suffix)
        }
        if len(found) == 1:
            return found.pop()
        if not found:
            raise ValueError(f"no .parquet, .json, .jsonl or .csv files found under {source!r}")
        raise ValueError(
            f"{source!r} contains files of several formats ({', '.join(sorted(found))}): {_FORMAT_HINT}"
        )
    raise ValueError(f"cannot tell the format of {source!r} from its name: {_FORMAT_HINT}")


def run_backfill(
    spark: SparkSession, options: BackfillOptions, settings: AwsSettings | None = None
) -> RunReport:
    """Apply events from files with the same trip writes; return the run report.

    Invalid rows are counted by reason and, with ``rejects_path``, written
    there as JSON Lines; the source files stay as they are, so a backfill can
    be run again after a fix and its writes stay idempotent.
    """
    settings = settings or AwsSettings.from_env()
    report = RunReport(mode="backfill", job_name=options.job_name)
    frame, fmt = read_source(spark, options.source, options.source_format)
    frame = frame.withColumn("_source_file", F.input_file_name())
    if fmt == "json":
        blank = F.trim(F.col("body")) == ""
        report.counts["blank_lines_skipped"] = frame.filter(blank).count()
        frame = frame.filter(~blank)
    parsed = (steps.parse_event_lines(frame) if fmt == "json" else steps.parse_records(frame)).persist(
        StorageLevel.MEMORY_AND_DISK
    )
    try:
        report.counts["rows_read"] = parsed.count()

        invalid = steps.invalid_events(parsed)
        for row in invalid.groupBy("reason").count().collect():
            report.outcomes["invalid"] += row["count"]
            report.reasons[row["reason"]] += row["count"]
        for row in invalid.select("_source_file", "trip_id", "reason", "detail").limit(20).collect():
            report.samples.append({"problem": "invalid_row", **row.asDict()})
        if options.rejects_path and report.outcomes["invalid"]:
            invalid.select("_source_file", "trip_id", "reason", "detail").write.mode("overwrite").json(
                options.rejects_path
            )
            report.counts["rejects_written"] = report.outcomes["invalid"]

        partitions = parallelism_of(spark, options.parallelism)
        events = steps.order_for_writes(steps.collapse_events(steps.valid_events(parsed)), partitions)
        writer = write_task(settings, options.table_name, options.write_threads)
        for partial in events.rdd.mapPartitions(writer).collect():
            report.add(partial)
    finally:
        parsed.unpersist()

    failed = report.outcomes.get("retry_later", 0) + report.outcomes.get("rejected", 0)
    report.finish("source applied" if not failed else f"{failed} events not written: run the backfill again")
    publish_report(report, options.report_path, options.metrics_namespace, settings)
    return report
