"""Lambda function end-taxi-trips: writes end-trip events from end-trip-stream.

The batch logic is in ``taxi_pipeline.stream``. Importing this module builds
no AWS client and reads no configuration. The first invocation does both.
"""

from __future__ import annotations

from taxi_pipeline.events import EventKind
from taxi_pipeline.stream import create_lambda_handler

lambda_handler = create_lambda_handler(EventKind.END)
