"""Reliability fixtures: the integration tests' tiny recipe."""

from tests.integration.conftest import tiny_recipe  # noqa: F401
