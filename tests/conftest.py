"""Shared fixtures live in tests/fixtures/; each area's own in tests/<area>/conftest.py."""

pytest_plugins = ["tests.fixtures.repos", "tests.fixtures.servers", "tests.fixtures.watchdog"]
