"""Typed errors of the trip library, one class per failure kind."""

from __future__ import annotations


class TaxiPipelineError(Exception):
    """Base class of every error this package raises on purpose."""


class InvalidEventError(TaxiPipelineError):
    """An event that can never be written: bad bytes, bad JSON or failed validation.

    ``reason`` is the stable code of the first problem; ``problems`` lists
    every problem found as ``(reason, field, detail)`` tuples.
    """

    def __init__(
        self,
        reason: str,
        detail: str,
        *,
        trip_id: str | None = None,
        problems: tuple[tuple[str, str | None, str], ...] = (),
    ) -> None:
        self.reason = reason
        self.detail = detail
        self.trip_id = trip_id
        self.problems = problems or ((reason, None, detail),)
        super().__init__(f"{reason}: {detail}")

    @property
    def reasons(self) -> tuple[str, ...]:
        """Return the distinct reason codes in the order they were found."""
        return tuple(dict.fromkeys(reason for reason, _, _ in self.problems))


class WriteError(TaxiPipelineError):
    """A trip write that DynamoDB did not accept."""

    retryable: bool = False

    def __init__(self, trip_id: str, reason: str, detail: str, *, code: str | None = None) -> None:
        self.trip_id = trip_id
        self.reason = reason
        self.detail = detail
        self.code = code
        super().__init__(f"trip {trip_id}: {reason}: {detail}")


class RetryableWriteError(WriteError):
    """A write that may succeed later: throttling, a 5xx, a network fault, a missing table."""

    retryable = True


class PermanentWriteError(WriteError):
    """A write that fails the same way every time, such as an item over 400 KB."""
