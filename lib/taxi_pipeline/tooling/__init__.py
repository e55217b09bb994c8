"""Local tooling, never shipped: local endpoint, packaging, deployment, demo and CLI."""
