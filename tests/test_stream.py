"""collective._stream: the streaming copy that reads out of alloc windows use, at every size and alignment."""
from __future__ import annotations

import platform

import numpy as np
import pytest

# The package's own installs (make install, CI) build the extension: its absence there is a failed build.
from collective import _stream as stream


def test_built_and_streaming_on_x86_64() -> None:
    assert stream.STREAMS == (platform.machine() in ("x86_64", "AMD64"))


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 63, 64, 65, 127, 4096 + 3, (1 << 20) + 61])
@pytest.mark.parametrize("shift", [(0, 0), (1, 0), (0, 5), (9, 3), (15, 15)])
def test_copy_exact_at_every_size_and_alignment(n: int, shift: tuple[int, int]) -> None:
    rng = np.random.default_rng(n)
    src_buf = rng.integers(0, 256, n + 64, dtype=np.uint8)
    dst_buf = np.full(n + 64, 0xA5, np.uint8)
    s, d = shift
    src = src_buf[s:s + n]
    before = src_buf.copy()
    stream.copy(dst_buf[d:d + n], src)
    assert (dst_buf[d:d + n] == src).all()
    assert (dst_buf[:d] == 0xA5).all() and (dst_buf[d + n:] == 0xA5).all(), "wrote outside the destination"
    assert (src_buf == before).all()


def test_copy_takes_any_dtype_as_bytes() -> None:
    src = np.arange(1000, dtype=np.complex128)
    dst = np.zeros_like(src)
    stream.copy(dst, src)
    assert (dst == src).all()


def test_copy_refuses_what_it_cannot_copy_whole() -> None:
    with pytest.raises(ValueError, match="destination of 8 bytes, source of 9"):
        stream.copy(np.zeros(8, np.uint8), np.zeros(9, np.uint8))
    ro = np.zeros(8, np.uint8)
    ro.flags.writeable = False
    with pytest.raises((BufferError, ValueError, TypeError)):
        stream.copy(ro, np.zeros(8, np.uint8))
    with pytest.raises((BufferError, ValueError, TypeError)):
        stream.copy(np.zeros(16, np.uint8)[::2], np.zeros(8, np.uint8))
    with pytest.raises(TypeError, match="two buffers"):
        stream.copy(np.zeros(8, np.uint8))


@pytest.mark.parametrize("shift", [8, -8, 100, -100])
def test_copy_between_overlapping_parts_of_one_buffer(shift: int) -> None:
    n = (1 << 16) + 7
    buf = np.arange(n + 200, dtype=np.uint8)
    want = buf.copy()
    lo = 100
    want[lo + shift:lo + shift + n - 100] = buf[lo:lo + n - 100].copy()
    stream.copy(buf[lo + shift:lo + shift + n - 100], buf[lo:lo + n - 100])
    assert (buf == want).all()
