"""The rolling line buffer: reads across frames, pads at the edges, forgets old frames."""

from __future__ import annotations

import numpy as np
import pytest

from edge.grabber.linebuffer import LineBuffer


def frames(count: int, lines: int = 10, width: int = 6) -> list[np.ndarray]:
    total = np.arange(count * lines * width, dtype=np.uint16).reshape(count * lines, width)
    return [total[i * lines : (i + 1) * lines] for i in range(count)]


def test_reads_across_frames_by_absolute_line():
    buffer = LineBuffer(keep_lines=100)
    parts = frames(3)
    assert [buffer.push(f) for f in parts] == [0, 10, 20]
    whole = np.concatenate(parts)
    np.testing.assert_array_equal(buffer.read(7, 23), whole[7:23])
    assert buffer.read(7, 23).dtype == np.uint16


def test_padded_read_repeats_the_nearest_pixel_and_says_so():
    buffer = LineBuffer(keep_lines=100)
    for f in frames(2):
        buffer.push(f)
    whole = np.concatenate(frames(2))
    region, padded = buffer.read_padded(x0=-2, first=-3, width=5, height=6)
    assert padded and region.shape == (6, 5)
    assert region[0, 0] == whole[0, 0] and region[5, 4] == whole[2, 2]
    inside, padded = buffer.read_padded(x0=1, first=4, width=3, height=8)
    assert not padded
    np.testing.assert_array_equal(inside, whole[4:12, 1:4])


def test_old_frames_are_dropped_and_cannot_be_read():
    buffer = LineBuffer(keep_lines=15)
    for f in frames(4):
        buffer.push(f)
    # 40 lines pushed, 15 kept: the frame holding lines 20-29 is still needed.
    assert buffer.start == 20 and buffer.end == 40
    with pytest.raises(IndexError):
        buffer.read(19, 25)


def test_a_frame_of_another_width_or_dtype_is_refused():
    buffer = LineBuffer(keep_lines=50)
    buffer.push(np.zeros((4, 6), np.uint8))
    with pytest.raises(ValueError):
        buffer.push(np.zeros((4, 7), np.uint8))
    with pytest.raises(ValueError):
        buffer.push(np.zeros((4, 6), np.uint16))
    with pytest.raises(ValueError):
        buffer.push(np.zeros((4, 6, 3), np.uint8))
