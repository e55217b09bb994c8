"""Plain AWS client settings that can cross process boundaries.

Spark ships closures to executors by pickling them, and a boto3 client does
not pickle. Tasks therefore receive an ``AwsSettings`` value and build their
own clients from it.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import boto3
from botocore.config import Config

RETRY_MODES = ("legacy", "standard", "adaptive")


@dataclass(frozen=True)
class AwsSettings:
    """Region, endpoint and retry settings for every client the product builds.

    ``endpoint_url`` ``None`` means the SDK's own resolution, which honours
    ``AWS_ENDPOINT_URL`` and the service-specific ``AWS_ENDPOINT_URL_<SERVICE>``.
    """

    region: str | None = None
    endpoint_url: str | None = None
    retry_mode: str = "standard"
    max_attempts: int = 3  # attempts in total, the first call included
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    max_pool_connections: int = 32

    def __post_init__(self) -> None:
        if self.retry_mode not in RETRY_MODES:
            raise ValueError(
                f"retry_mode {self.retry_mode!r} is invalid: use one of {', '.join(RETRY_MODES)}"
            )
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.max_pool_connections < 1:
            raise ValueError(f"max_pool_connections must be at least 1, got {self.max_pool_connections}")

    @classmethod
    def from_env(cls, **overrides: Any) -> AwsSettings:
        """Read region and retry settings from the standard AWS environment variables."""
        values: dict[str, Any] = {
            "region": os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"),
            "retry_mode": os.environ.get("AWS_RETRY_MODE", "standard"),
        }
        attempts = os.environ.get("AWS_MAX_ATTEMPTS")
        if attempts:
            try:
                values["max_attempts"] = int(attempts)
            except ValueError as exc:
                raise ValueError(f"AWS_MAX_ATTEMPTS must be a whole number, got {attempts!r}") from exc
        values.update({key: value for key, value in overrides.items() if value is not None})
        return cls(**values)

    def client_config(self, **overrides: Any) -> Config:
        """Return the botocore ``Config`` for these settings."""
        options: dict[str, Any] = {
            # total_max_attempts counts the first call, as AWS_MAX_ATTEMPTS does;
            # botocore's max_attempts key would count retries only.
            "retries": {"mode": self.retry_mode, "total_max_attempts": self.max_attempts},
            "connect_timeout": self.connect_timeout,
            "read_timeout": self.read_timeout,
            "max_pool_connections": self.max_pool_connections,
        }
        options.update(overrides)
        return Config(**options)

    def client(self, service: str, **config_overrides: Any) -> Any:
        """Build a new low-level boto3 client for ``service``."""
        session = boto3.session.Session(region_name=self.region)
        return session.client(
            service,
            endpoint_url=self.endpoint_url,
            config=self.client_config(**config_overrides),
        )
