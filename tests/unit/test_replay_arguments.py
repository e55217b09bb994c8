"""Glue job arguments: required through getResolvedOptions, optional with defaults."""

from __future__ import annotations

import pytest
from awsglue.utils import GlueArgumentError

from taxi_pipeline.replay.arguments import (
    backfill_options,
    read_optional,
    replay_options,
    resolve_arguments,
)
from taxi_pipeline.replay.options import ReplayOptions

BASE = ["script.py", "--JOB_NAME", "replay", "--queue_url", "http://q", "--table_name", "trips"]


def test_optional_arguments_may_all_be_absent():
    options = replay_options(resolve_arguments(BASE))
    assert options == ReplayOptions(queue_url="http://q", table_name="trips", job_name="replay")


def test_optional_arguments_are_typed():
    argv = BASE + [
        "--max_messages",
        "50",
        "--dry_run",
        "true",
        "--wait_time_seconds=2",
        "--report_path",
        "/tmp/r",
    ]
    options = replay_options(resolve_arguments(argv))
    assert (options.max_messages, options.dry_run, options.wait_time_seconds) == (50, True, 2)
    assert options.report_path == "/tmp/r"


def test_glue_system_arguments_are_ignored():
    argv = BASE + ["--job-bookmark-option", "job-bookmark-disable", "--TempDir", "s3://b/t"]
    assert replay_options(resolve_arguments(argv)).queue_url == "http://q"


def test_missing_required_argument_fails():
    with pytest.raises(GlueArgumentError, match="--queue_url"):
        resolve_arguments(["script.py", "--JOB_NAME", "replay", "--table_name", "trips"])


@pytest.mark.parametrize(
    ("argument", "message"),
    [
        (["--max_messages", "many"], "--max_messages must be a int"),
        (["--dry_run", "maybe"], "--dry_run must be true or false"),
    ],
)
def test_bad_optional_value_names_the_argument(argument, message):
    with pytest.raises(ValueError, match=message):
        resolve_arguments(BASE + argument)


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("wait_time_seconds", 21, "from 0 to 20"),
        ("visibility_timeout", 50_000, "from 1 to 43200"),
        ("visibility_timeout", 20, "longer than twice wait_time_seconds"),
        ("wave_size", 0, "wave_size must be a positive number"),
    ],
)
def test_out_of_range_options_are_rejected(field, value, message):
    with pytest.raises(ValueError, match=message):
        ReplayOptions(queue_url="q", table_name="t", **{field: value})


def test_backfill_options_from_arguments():
    arguments = resolve_arguments(BASE + ["--source", "s3://bucket/events/", "--source_format", "parquet"])
    options = backfill_options(arguments)
    assert (options.source, options.source_format, options.table_name) == (
        "s3://bucket/events/",
        "parquet",
        "trips",
    )


def test_flag_without_value_reads_as_true():
    assert read_optional(["--dry_run", "--max_messages", "3"], ["dry_run", "max_messages"]) == {
        "dry_run": "true",
        "max_messages": "3",
    }
