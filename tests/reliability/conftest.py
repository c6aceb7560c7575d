"""Fixtures of the reliability tests."""

from __future__ import annotations

import pytest
from crash_support import Runner


@pytest.fixture(scope="module")
def runner():
    r = Runner()
    yield r
    r.close()
