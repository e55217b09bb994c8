"""Benchmarks of the taxi-trip pipeline against a local MiniStack: ``python -m bench.run``.

The package measures the replay job (``taxi_pipeline.replay.run_replay``)
at several queue depths beside a naive one-message-at-a-time consumer and
MiniStack's own ``UpdateItem`` ceiling, the two stream functions, and a
backfill from Parquet. ``bench.run`` prints the figures and writes them
into ``docs/benchmarks.md``.

Nothing here ships. Trip rows are read from the sample folder at run time
(or generated when it is missing) and never stored in the repository.
"""
