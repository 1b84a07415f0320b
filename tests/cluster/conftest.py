"""Fixtures of the Ray tests."""

from __future__ import annotations

import logging

import pytest
import ray


@pytest.fixture(scope="module")
def local_ray():
    """One local Ray instance for the module (a job that finds Ray running keeps it)."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             logging_level=logging.WARNING)
    yield
    ray.shutdown()
