"""Fixtures shared by the ingest tests: ``http_server``, a local HTTP server with scripted faults."""

from scgrn_assets_tests.http_server import http_server  # noqa: F401 (fixture)
