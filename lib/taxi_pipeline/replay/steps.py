"""The replay job's pure DataFrame steps: parse, split, collapse and order.

Each step takes and returns a DataFrame and has no side effect, so the steps
are tested with small DataFrames and reused by the queue drain and by the
backfill from files.
"""

from __future__ import annotations

from pyspark.sql import Column, DataFrame
from pyspark.sql import functions as F
from pyspark.sql.types import (
    BooleanType,
    DoubleType,
    IntegerType,
    LongType,
    StringType,
    StructField,
    StructType,
)

from taxi_pipeline.envelope import open_message
from taxi_pipeline.errors import InvalidEventError
from taxi_pipeline.events import EventKind, event_to_json, parse_event

MESSAGE_SCHEMA = StructType(
    [
        StructField("message_id", StringType(), False),
        StructField("receipt_handle", StringType(), False),
        StructField("body", StringType(), True),
        StructField("receive_count", IntegerType(), False),
        StructField("sent_timestamp_ms", LongType(), False),
        StructField("received_at", DoubleType(), False),
    ]
)

PARSED_SCHEMA = StructType(
    [
        StructField("valid", BooleanType(), False),
        StructField("kind", StringType(), True),
        StructField("trip_id", StringType(), True),
        StructField("revision", StringType(), True),
        StructField("event_json", StringType(), True),
        StructField("ignored_fields", IntegerType(), False),
        StructField("reason", StringType(), True),
        StructField("detail", StringType(), True),
    ]
)

MAX_DETAIL_LENGTH = 512


def _parsed_row(parse) -> tuple:
    try:
        event = parse()
    except InvalidEventError as exc:
        return (False, None, exc.trip_id, None, None, 0, exc.reason, exc.detail[:MAX_DETAIL_LENGTH])
    except Exception as exc:  # noqa: BLE001 - one defective message must not fail the wave
        detail = f"parsing failed with {type(exc).__name__}: {exc}"
        return (False, None, None, None, None, 0, "event_unparseable", detail[:MAX_DETAIL_LENGTH])
    return (
        True,
        event.kind.value,
        event.trip_id,
        event.revision,
        event_to_json(event),
        len(event.ignored_fields),
        None,
        None,
    )


def parse_message_body(body: str | None) -> tuple:
    """Parse one retry-queue message body (an envelope or a bare event) into a ``PARSED_SCHEMA`` row."""
    return _parsed_row(lambda: open_message(body or "").parse())


def parse_event_body(body: str | None, kind: str | None = None) -> tuple:
    """Parse one raw event body of a known or inferred kind into a ``PARSED_SCHEMA`` row."""
    return _parsed_row(lambda: parse_event(body or "", kind))


def parse_record(record, kind: str | None = None) -> tuple:
    """Parse a row of a backfill file (a Spark ``Row`` of its columns) into a ``PARSED_SCHEMA`` row.

    Spark hands doubles to Python as floats, bit for bit, and ``parse_event``
    converts floats through their shortest repr, so Parquet money columns
    arrive as the decimals that were written. CSV columns are read as text.
    """
    return _parsed_row(lambda: parse_event(record.asDict() if record is not None else {}, kind))


_parse_message_udf = F.udf(parse_message_body, PARSED_SCHEMA)
_parse_event_udf = F.udf(parse_event_body, PARSED_SCHEMA)
_parse_record_udf = F.udf(parse_record, PARSED_SCHEMA)


def _expand(df: DataFrame, parsed: Column) -> DataFrame:
    # Source columns named like a result column (a record's own trip_id) give way to the result.
    result_names = set(PARSED_SCHEMA.fieldNames())
    kept = [F.col(f"`{name}`") for name in df.columns if name not in result_names]
    return df.select(*kept, parsed.alias("parsed")).select("*", "parsed.*").drop("parsed")


def parse_messages(messages: DataFrame) -> DataFrame:
    """Add the parse result columns of ``PARSED_SCHEMA`` to a DataFrame of queue messages."""
    return _expand(messages, _parse_message_udf(F.col("body")))


def parse_event_lines(lines: DataFrame, kind: EventKind | None = None) -> DataFrame:
    """Parse a DataFrame with a ``body`` column of raw JSON events (JSON Lines backfill)."""
    kind_column = F.lit(kind.value if kind else None).cast("string")
    return _expand(lines, _parse_event_udf(F.col("body"), kind_column))


def parse_records(records: DataFrame, kind: EventKind | None = None) -> DataFrame:
    """Parse a DataFrame of typed or string columns (Parquet or CSV backfill), one row an event.

    Columns whose names start with ``_`` (such as ``_source_file``) are kept
    beside the result and not parsed.
    """
    columns = [column for column in records.columns if not column.startswith("_")]
    kind_column = F.lit(kind.value if kind else None).cast("string")
    record = F.struct(*[F.col(f"`{column}`") for column in columns])
    return _expand(records, _parse_record_udf(record, kind_column))


def valid_events(parsed: DataFrame) -> DataFrame:
    """Keep the rows that parsed into a valid event."""
    return parsed.filter(F.col("valid"))


def invalid_events(parsed: DataFrame) -> DataFrame:
    """Keep the rows that failed to parse or validate."""
    return parsed.filter(~F.col("valid"))


def collapse_events(valid: DataFrame, message_columns: tuple[str, ...] = ()) -> DataFrame:
    """Collapse identical events (same trip, kind and revision) into one row.

    ``copies`` counts the rows that carried the event. ``message_columns``
    names the columns kept for every copy in the ``messages`` array, such as
    receipt handles, so each copy can be deleted once its event is in.
    Identical revisions mean identical content, so ``min`` of the event JSON
    only makes the choice deterministic.
    """
    aggregates = [F.min("event_json").alias("event_json"), F.count(F.lit(1)).alias("copies")]
    if message_columns:
        aggregates.append(
            F.sort_array(F.collect_list(F.struct(*message_columns))).alias("messages"),
        )
    return valid.groupBy("trip_id", "kind", "revision").agg(*aggregates)


def kind_rank(kind: Column) -> Column:
    """Rank start events before end events, the natural order of a trip."""
    return F.when(kind == F.lit(EventKind.START.value), F.lit(0)).otherwise(F.lit(1))


def order_for_writes(events: DataFrame, partitions: int) -> DataFrame:
    """Place all events of a trip in one partition, in natural order.

    Within a partition rows are sorted by trip id, then start before end,
    then by revision, so each task writes a trip's events in a fixed order.
    """
    if partitions < 1:
        raise ValueError(f"partitions must be at least 1, got {partitions}")
    return (
        events.repartition(partitions, "trip_id")
        .withColumn("kind_rank", kind_rank(F.col("kind")))
        .sortWithinPartitions("trip_id", "kind_rank", "revision")
        .drop("kind_rank")
    )
