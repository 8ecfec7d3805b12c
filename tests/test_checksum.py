"""CRC-32C: known answers and agreement with a bitwise reference, any chunking."""

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from embfile import _core


def crc32c_reference(data, crc=0):
    crc ^= 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def test_known_answers():
    assert _core.crc32c(b"123456789") == 0xE3069283  # the standard check value
    assert _core.crc32c(b"") == 0
    assert _core.crc32c(bytes(32)) == 0x8A9136AA  # RFC 3720 B.4
    assert _core.crc32c(b"\xff" * 32) == 0x62A8AB43


@given(st.binary(max_size=300), st.integers(0, 300))
def test_matches_reference_and_chains(data, cut):
    assert _core.crc32c(data) == crc32c_reference(data)
    cut = min(cut, len(data))
    assert _core.crc32c(data[cut:], _core.crc32c(data[:cut])) == _core.crc32c(data)


@pytest.mark.parametrize("size", [3 * 4096 - 1, 3 * 4096, 3 * 4096 + 7, 9 * 4096 + 13])
def test_long_buffers_three_streams_at_a_time(size):
    """From 12 KiB the hardware path runs three streams and joins them: any length, any start."""
    data = np.random.default_rng(size).integers(0, 256, size + 3, dtype=np.uint8).tobytes()
    for start in (0, 3):
        assert _core.crc32c(data[start : start + size]) == crc32c_reference(data[start : start + size])
    assert _core.crc32c(data[5000:], _core.crc32c(data[:5000])) == crc32c_reference(data)


def test_blocks():
    data = np.random.default_rng(0).integers(0, 256, 10_000, dtype=np.uint8).tobytes()
    sums = _core.crc32c_blocks(data, 4096)
    assert list(sums) == [_core.crc32c(data[i : i + 4096]) for i in range(0, 10_000, 4096)]
