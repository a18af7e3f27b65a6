import pytest

from .bplane_codec import bplane_registered


@pytest.fixture
def bplane_codec():
    """The bplane codec, in tier.codecs' tables for the test (see bplane_codec.py)."""
    with bplane_registered() as c:
        yield c
