"""Describe the machine and the software versions a benchmark ran on."""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from bench.processes import load_average

REPO_ROOT = Path(__file__).resolve().parents[1]
MINISTACK_PYTHON = REPO_ROOT / ".venv-ministack" / "bin" / "python"


def cpu_model() -> str:
    """Return the CPU model name from ``/proc/cpuinfo``, or the platform's processor name."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def memory_gib() -> float:
    """Return the total memory in GiB from ``/proc/meminfo``, or 0 when it is unreadable."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / (1024 * 1024), 1)
    except OSError:
        pass
    return 0.0


def java_version() -> str:
    """Return the first line of ``java -version``, or ``unknown``."""
    try:
        completed = subprocess.run(
            ["java", "-version"], capture_output=True, text=True, timeout=30, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    lines = (completed.stderr or completed.stdout).splitlines()
    return lines[0].strip() if lines else "unknown"


def _version(package: str) -> str:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return "not installed"


def ministack_version() -> str:
    """Return the MiniStack version installed in ``.venv-ministack``."""
    if not MINISTACK_PYTHON.exists():
        return "not installed"
    try:
        completed = subprocess.run(
            [
                str(MINISTACK_PYTHON),
                "-c",
                "import importlib.metadata as m; print(m.version('ministack'))",
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return completed.stdout.strip() or "unknown"


def code_version() -> str:
    """Return ``git describe --always --dirty`` of the checkout the benchmark runs from."""
    try:
        completed = subprocess.run(
            ["git", "-C", str(REPO_ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return completed.stdout.strip() or "unknown (not a git checkout)"


def describe_machine() -> dict[str, Any]:
    """Return the CPU, cores, memory, load and software versions of this machine."""
    return {
        "cpu_model": cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": memory_gib(),
        "load_average_at_start": load_average(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "python_executable": sys.executable,
        "java": java_version(),
        "pyspark": _version("pyspark"),
        "boto3": _version("boto3"),
        "aws_lambda_powertools": _version("aws-lambda-powertools"),
        "ministack": ministack_version(),
        "code_version": code_version(),
    }
