import pytest

from tests.helpers import make_ns


@pytest.fixture
def ns():
    return make_ns()
