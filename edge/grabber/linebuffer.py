"""A rolling buffer of the most recent lines of a line-scan stream, addressed by line index.

Frames arrive as 2-D grey arrays ``(lines, pixels)``, one after another along the track. The
buffer numbers every line from the start of the run (the *absolute line index*), so a region
that straddles two or more frames is read as one piece and a fastener cut there is cut whole.

Frames are kept as they came (no copy on push); reading a region copies only that region.
Old frames are dropped once every line they hold is older than ``keep_lines``.
"""

from __future__ import annotations

from collections import deque

import numpy as np


class LineBuffer:
    """The last ``keep_lines`` (or more, whole frames) lines of a stream.

    Known limit: every frame must have the width and dtype of the first one; a camera that
    changes its region of interest mid-run needs a new buffer (a ``ValueError`` says so).
    """

    def __init__(self, keep_lines: int) -> None:
        if keep_lines <= 0:
            raise ValueError("keep_lines must be positive")
        self.keep_lines = keep_lines
        self._frames: deque[tuple[int, np.ndarray]] = deque()  # (first line index, lines)
        self.end = 0  # one past the newest line index
        self.width: int | None = None
        self.dtype: np.dtype | None = None

    @property
    def start(self) -> int:
        """Absolute index of the oldest line held (equal to ``end`` when empty)."""
        return self._frames[0][0] if self._frames else self.end

    def push(self, frame: np.ndarray) -> int:
        """Append a frame ``(lines, pixels)``; returns the absolute index of its first line."""
        if frame.ndim != 2 or frame.shape[0] == 0 or frame.shape[1] == 0:
            raise ValueError(f"a frame must be a non-empty 2-D grey array, got {frame.shape}")
        if self.width is None:
            self.width, self.dtype = frame.shape[1], frame.dtype
        elif frame.shape[1] != self.width or frame.dtype != self.dtype:
            raise ValueError(
                f"frame {frame.shape} {frame.dtype} differs from the stream's "
                f"(lines, {self.width}) {self.dtype}"
            )
        first = self.end
        self._frames.append((first, frame))
        self.end += frame.shape[0]
        while len(self._frames) > 1:
            first_kept, lines = self._frames[0]
            if first_kept + lines.shape[0] > self.end - self.keep_lines:
                break
            self._frames.popleft()
        return first

    def read(self, first: int, last: int) -> np.ndarray:
        """Lines ``[first, last)`` as one array ``(last - first, pixels)``.

        Raises ``IndexError`` when part of the range is no longer (or not yet) held.
        """
        if first < self.start or last > self.end or last < first:
            raise IndexError(
                f"lines [{first}, {last}) outside the buffer [{self.start}, {self.end})"
            )
        pieces = []
        for frame_first, lines in self._frames:
            frame_last = frame_first + lines.shape[0]
            if frame_last <= first or frame_first >= last:
                continue
            pieces.append(
                lines[max(first, frame_first) - frame_first : min(last, frame_last) - frame_first]
            )
        if len(pieces) == 1:
            return pieces[0]
        if not pieces:
            return np.empty((0, self.width or 0), dtype=self.dtype)
        return np.concatenate(pieces, axis=0)

    def read_padded(self, x0: int, first: int, width: int, height: int) -> tuple[np.ndarray, bool]:
        """A ``(height, width)`` region with top-left pixel ``(x0, first)``, always whole.

        Where the region runs past the image side or past the held lines, the nearest held
        pixel is repeated. Returns the region (a new array) and whether any of it was padded.
        """
        assert self.width is not None
        held_first, held_last = max(first, self.start), min(first + height, self.end)
        col_first, col_last = max(x0, 0), min(x0 + width, self.width)
        if held_last <= held_first or col_last <= col_first:
            raise IndexError(f"region at x={x0}, line={first} lies wholly outside the buffer")
        region = self.read(held_first, held_last)[:, col_first:col_last]
        pads = (
            held_first - first,
            first + height - held_last,
            col_first - x0,
            x0 + width - col_last,
        )
        if not any(pads):
            return np.array(region, copy=True), False
        padded = np.pad(region, ((pads[0], pads[1]), (pads[2], pads[3])), mode="edge")
        return padded, True
