"""The asynchronous job path: /v1/jobs backed by Redis, run by in-process workers."""
