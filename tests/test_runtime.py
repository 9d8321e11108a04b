"""Device, precision and memory budget."""

from __future__ import annotations

import pytest

from medseg.errors import ModelError
from medseg.runtime import parse_bytes


def test_parse_bytes_units() -> None:
    assert parse_bytes("4G") == 4 << 30
    assert parse_bytes("512M") == 512 << 20
    assert parse_bytes("1.5g") == int(1.5 * (1 << 30))
    assert parse_bytes("2000") == 2000
    with pytest.raises(ModelError):
        parse_bytes("lots")
