"""Shared fixtures of the core tests (helpers live in abd_testutils.py)."""
from __future__ import annotations

import pytest

from abd_testutils import _poisoned_digits_cnn


@pytest.fixture(scope="session")
def poisoned_digits():
    """(model, x_test, y_test): a 5-conv CNN with a corner-patch backdoor to class 0."""
    return _poisoned_digits_cnn()
