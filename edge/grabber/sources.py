"""Frame sources: a recorded run, a live camera or a folder of stills, behind one interface.

Every source yields :class:`Frame` objects whose ``image`` is a grey ``(lines, pixels)`` array,
``uint8`` or ``uint16``: rows are scan lines in capture order (along the track), columns are
pixels across the track. A new camera (say a GigE line-scan camera through its vendor SDK) is
one more :class:`FrameSource` subclass; nothing downstream changes.

Recordings are read with OpenCV's FFmpeg backend. What OpenCV 5.x does, as measured here with
opencv-python-headless 5.1 (see opencv/opencv#22894 for the 16-bit support):

- By default FFmpeg frames are converted to 8-bit BGR, even grey and 16-bit ones.
- With ``CAP_PROP_CONVERT_RGB`` off the decoder's own format comes back; OpenCV only vouches
  for GRAY8 (``Y800``) and GRAY16LE (``Y1\\0\\x10``), which give ``(h, w)`` ``uint8`` and
  ``uint16`` bit-exact. Other formats (yuv420p, bgr0, ...) come back as odd planar shapes, so
  those files are read as BGR and turned grey with ``cv2.cvtColor``. Which path a file takes
  is decided once, at open, from ``CAP_PROP_CODEC_PIXEL_FORMAT``.
- ``CAP_PROP_FRAME_COUNT`` is estimated from the header's duration and frame rate; it is
  garbage for a file whose writer died. It is never used to stop reading.
- FFmpeg drops a frame whose packet is cut short and ``read()`` then just returns False, as
  at a clean end. So truncation is told from the container: a Matroska Segment (or a RIFF
  chunk) declares its size when the writer closes the file; a file shorter than declared, or
  a Segment whose size was never written, is truncated.
"""

from __future__ import annotations

import re
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from edge.errors import InputUnreadableError
from edge.logs import get_logger

log = get_logger(__name__)

# FourCC tags FFmpeg reports through CAP_PROP_CODEC_PIXEL_FORMAT for the two grey formats
# that OpenCV hands out undecorated when CAP_PROP_CONVERT_RGB is off.
GREY_PIXEL_FORMATS = {b"Y800": 8, b"Y1\x00\x10": 16}
IMAGE_SUFFIXES = {".png", ".tif", ".tiff", ".bmp", ".jpg", ".jpeg", ".pgm", ".pnm", ".ppm"}

_EBML_MAGIC = b"\x1a\x45\xdf\xa3"
_MATROSKA_SEGMENT = 0x18538067


@dataclass(frozen=True)
class Frame:
    """One frame of scan lines.

    ``image``: ``(lines, pixels)`` grey, ``uint8`` or ``uint16``. ``index`` counts frames of
    the source from 0, so line ``r`` of the frame is line ``index * lines + r`` of the run.
    ``timestamp_s``: for a recording, its presentation time from the start of the file; for a
    camera, UTC seconds since the Unix epoch when the frame was read; for stills,
    ``index / frame_rate_hz``. A crop's capture time comes from
    :class:`edge.telemetry.position.Positioner`, not from here.
    """

    index: int
    image: np.ndarray
    timestamp_s: float


def to_grey(image: np.ndarray, name: str) -> np.ndarray:
    """``(h, w)``, ``(h, w, 1)``, BGR ``(h, w, 3)`` or BGRA ``(h, w, 4)`` -> grey ``(h, w)``."""
    if image.dtype not in (np.uint8, np.uint16):
        raise InputUnreadableError(f"{name}: pixels are {image.dtype}, not 8- or 16-bit")
    if image.ndim == 2:
        return image
    if image.ndim == 3 and image.shape[2] == 1:
        return image[:, :, 0]
    if image.ndim == 3 and image.shape[2] == 3:
        return cv2.cvtColor(image, cv2.COLOR_BGR2GRAY)
    if image.ndim == 3 and image.shape[2] == 4:
        return cv2.cvtColor(image, cv2.COLOR_BGRA2GRAY)
    raise InputUnreadableError(f"{name}: image of shape {image.shape} is not grey or colour")


@contextmanager
def _opencv_quiet():
    """Keep OpenCV's own warnings (plain text) out of our JSON log while opening a file."""
    level = cv2.utils.logging.getLogLevel()
    cv2.utils.logging.setLogLevel(cv2.utils.logging.LOG_LEVEL_ERROR)
    try:
        yield
    finally:
        cv2.utils.logging.setLogLevel(level)


class FrameSource(ABC):
    """A stream of :class:`Frame`; iterate it, then check :attr:`truncated`.

    ``truncated`` is set after the last frame when the source ended early (a recording cut
    short); callers turn it into ``ExitStatus.RECORDING_TRUNCATED``.
    """

    name: str = "<source>"
    truncated: bool = False

    @abstractmethod
    def frames(self) -> Iterator[Frame]:
        """Frames in capture order."""

    def __iter__(self) -> Iterator[Frame]:
        return self.frames()

    def close(self) -> None:
        """Release the device or file; the default has nothing to release."""
        return None

    def __enter__(self) -> FrameSource:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


# Recordings --------------------------------------------------------------------------------


def _ebml_vint(data: bytes, pos: int) -> tuple[int, int, bool]:
    """(value without the length marker, byte length, all value bits set = "unknown size")."""
    first = data[pos]
    if first == 0:
        raise ValueError("EBML variable-length integer longer than 8 bytes")
    length = 9 - first.bit_length()
    if pos + length > len(data):
        raise ValueError("EBML variable-length integer cut short")
    mask = (1 << (7 * length)) - 1
    value = int.from_bytes(data[pos : pos + length], "big") & mask
    return value, length, value == mask


def container_truncation(path: str | Path) -> str | None:
    """Why the container says the file is cut short, or ``None`` if it does not (or cannot).

    Matroska/WebM: the EBML header, then the Segment, whose size the muxer writes when it
    closes the file (until then it is "unknown", all ones). RIFF (AVI): the size of the first
    RIFF chunk. Other containers: ``None``; they are not checked.
    """
    path = Path(path)
    file_size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(256)
    try:
        if head.startswith(_EBML_MAGIC):
            header_size, length, _ = _ebml_vint(head, 4)
            pos = 4 + length + header_size
            element = int.from_bytes(head[pos : pos + 4], "big")
            if element != _MATROSKA_SEGMENT:
                return None
            size, length, unknown = _ebml_vint(head, pos + 4)
            if unknown:
                return "Matroska segment size never written (the writer did not close the file)"
            end = pos + 4 + length + size
            if end > file_size:
                return f"Matroska segment ends at byte {end}, the file has {file_size}"
        elif head[:4] == b"RIFF" and len(head) >= 8:
            end = 8 + int.from_bytes(head[4:8], "little")
            if end > file_size:
                return f"RIFF chunk ends at byte {end}, the file has {file_size}"
    except (ValueError, IndexError):
        return "container header cut short"
    return None


def _fourcc_bytes(value: float) -> bytes:
    code = int(value) & 0xFFFFFFFF
    return code.to_bytes(4, "little")


class RecordingSource(FrameSource):
    """A recorded run (``run.mkv``), read until the stream ends, whatever the header says.

    8-bit and 16-bit grey come back as stored (16-bit FFV1 bit-exact); anything else is read
    as BGR and made grey. Iterating again reopens the file. After the last frame,
    :attr:`truncated` tells whether the file was cut short (module docstring), and a warning
    ``recording_truncated`` naming the file is logged.

    Known limit: a damaged packet in the middle of the file is skipped or decoded as best it
    can be by FFmpeg without notice to OpenCV (an FFV1 slice CRC mismatch is only printed on
    stderr), so such a frame is missing from the stream or holds damaged lines.

    Raises:
        InputUnreadableError: at construction, for a missing, empty or non-video file, or one
            in which no frame can be decoded; the message names the file.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.name = str(self.path)
        self.truncated = False
        self.frames_read = 0
        self._capture, self._first = self._open()
        self.dtype = self._first.image.dtype
        self.frame_shape: tuple[int, int] = self._first.image.shape

    @property
    def bit_depth(self) -> int:
        return 16 if self.dtype == np.uint16 else 8

    def _open(self) -> tuple[cv2.VideoCapture, Frame]:
        if not self.path.is_file():
            raise InputUnreadableError(f"{self.path}: no such recording file")
        if self.path.stat().st_size == 0:
            raise InputUnreadableError(f"{self.path}: empty file, not a video")
        with _opencv_quiet():
            capture = cv2.VideoCapture(str(self.path), cv2.CAP_FFMPEG)
        if not capture.isOpened():
            raise InputUnreadableError(self._unreadable("not a video that FFmpeg can read"))
        self.pixel_format = _fourcc_bytes(capture.get(cv2.CAP_PROP_CODEC_PIXEL_FORMAT))
        self.native_grey = self.pixel_format in GREY_PIXEL_FORMATS
        if self.native_grey:
            with _opencv_quiet():
                capture.set(cv2.CAP_PROP_CONVERT_RGB, 0)
        ok, image = capture.read()
        if not ok:
            capture.release()
            raise InputUnreadableError(self._unreadable("no frame could be decoded"))
        first = Frame(0, to_grey(image, self.name), capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
        log.info(
            "recording_opened",
            file=self.name,
            pixel_format=self.pixel_format.decode("latin-1"),
            native_grey=self.native_grey,
            lines=first.image.shape[0],
            pixels=first.image.shape[1],
            bit_depth=16 if first.image.dtype == np.uint16 else 8,
        )
        return capture, first

    def _unreadable(self, problem: str) -> str:
        """The message for a file that gives no frame, saying when the file is cut short."""
        reason = container_truncation(self.path)
        if reason is None:
            return f"{self.path}: {problem}"
        return f"{self.path}: {problem}; the file is cut short before its first frame ({reason})"

    def frames(self) -> Iterator[Frame]:
        if self._capture is not None:
            capture, first = self._capture, self._first
            self._capture = None
        else:
            capture, first = self._open()
        self.truncated = False
        index = 0
        try:
            yield first
            index = 1
            while True:
                ok, image = capture.read()
                if not ok:
                    break
                image = to_grey(image, self.name)
                if image.shape != first.image.shape or image.dtype != first.image.dtype:
                    raise InputUnreadableError(
                        f"{self.path}: frame {index} is {image.shape} {image.dtype}, "
                        f"frame 0 was {first.image.shape} {first.image.dtype}"
                    )
                yield Frame(index, image, capture.get(cv2.CAP_PROP_POS_MSEC) / 1000.0)
                index += 1
            declared = capture.get(cv2.CAP_PROP_FRAME_COUNT)
        finally:
            capture.release()
            self.frames_read = index
        reason = container_truncation(self.path)
        if reason is not None:
            self.truncated = True
            log.warning("recording_truncated", file=self.name, frames=index, reason=reason)
        elif declared > 0 and round(declared) != index:
            # Header counts are estimates; this is worth a look but is not proof of a cut.
            log.warning(
                "recording_frame_count_differs",
                file=self.name,
                frames=index,
                header_frames=round(declared),
            )
        log.info("recording_ended", file=self.name, frames=index, truncated=self.truncated)

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


# Live cameras ------------------------------------------------------------------------------


class CameraSource(FrameSource):
    """A live camera: an OpenCV device index (V4L2 on Linux) or a GStreamer pipeline string.

    ``raw=True`` asks OpenCV not to convert to BGR, for mono cameras that deliver GREY or Y16
    (16-bit frames then stay 16-bit); otherwise frames come as BGR and are made grey.
    ``timestamp_s`` is the UTC time the frame was read. A failed read ends the stream with a
    ``camera_read_failed`` warning, so the supervisor sees the end and can restart the grabber.

    Known limit: untested against a real camera here (the test machine has none); only the
    construction errors are tested. The OpenCV wheel in use has no GStreamer backend, so a
    pipeline string fails at open with a message saying so; the vehicle needs an OpenCV built
    with GStreamer for it.

    Raises:
        InputUnreadableError: the device or pipeline cannot be opened.
    """

    def __init__(self, device: int | str, raw: bool = False):
        self.device = device
        self.name = f"camera:{device}"
        self.truncated = False
        if isinstance(device, str):
            if not cv2.videoio_registry.hasBackend(cv2.CAP_GSTREAMER):
                raise InputUnreadableError(
                    f"camera pipeline {device!r}: this OpenCV build has no GStreamer backend"
                )
            api = cv2.CAP_GSTREAMER
        else:
            api = cv2.CAP_ANY
        with _opencv_quiet():
            self._capture = cv2.VideoCapture(device, api)
        if not self._capture.isOpened():
            raise InputUnreadableError(f"{self.name}: the camera cannot be opened")
        if raw:
            self._capture.set(cv2.CAP_PROP_CONVERT_RGB, 0)

    def frames(self) -> Iterator[Frame]:
        index = 0
        while self._capture is not None:
            ok, image = self._capture.read()
            if not ok:
                log.warning("camera_read_failed", camera=self.name, frames=index)
                return
            yield Frame(index, to_grey(image, self.name), time.time())
            index += 1

    def close(self) -> None:
        if self._capture is not None:
            self._capture.release()
            self._capture = None


# Stills ------------------------------------------------------------------------------------


def _natural_key(path: Path) -> list:
    """``frame2.png`` before ``frame10.png``."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def read_image(path: str | Path) -> np.ndarray:
    """One image file as grey ``(h, w)`` ``uint8``/``uint16`` (16-bit PNG/TIFF kept 16-bit).

    Raises:
        InputUnreadableError: the file is missing or not an image OpenCV can decode.
    """
    if not Path(path).is_file():
        problem = "a folder, not an image" if Path(path).is_dir() else "no such image file"
        raise InputUnreadableError(f"{path}: {problem}")
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if image is None:
        raise InputUnreadableError(f"{path}: not an image that OpenCV can read")
    return to_grey(image, str(path))


class StillsSource(FrameSource):
    """The image files of a folder (PNG, TIFF, BMP, JPEG, PGM), in natural name order.

    Every image must have the size and bit depth of the first. ``timestamp_s`` is
    ``index / frame_rate_hz``.

    Raises:
        InputUnreadableError: the folder is missing or has no image (at construction), or an
            image cannot be read or differs in size or depth (when it is reached).
    """

    def __init__(self, folder: str | Path, frame_rate_hz: float = 10.0):
        self.folder = Path(folder)
        self.name = str(self.folder)
        self.frame_rate_hz = frame_rate_hz
        self.truncated = False
        if not self.folder.is_dir():
            raise InputUnreadableError(f"{self.folder}: not a folder of still images")
        self.paths = sorted(
            (
                p
                for p in self.folder.iterdir()
                if p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
            ),
            key=_natural_key,
        )
        if not self.paths:
            raise InputUnreadableError(f"{self.folder}: no image files in the folder")
        first = read_image(self.paths[0])
        self.frame_shape: tuple[int, int] = first.shape
        self.dtype = first.dtype

    def frames(self) -> Iterator[Frame]:
        for index, path in enumerate(self.paths):
            image = read_image(path)
            if image.shape != self.frame_shape or image.dtype != self.dtype:
                raise InputUnreadableError(
                    f"{path}: {image.shape} {image.dtype} differs from the first still "
                    f"{self.paths[0].name} ({self.frame_shape} {self.dtype})"
                )
            yield Frame(index, image, index / self.frame_rate_hz)


def open_source(spec: str | int | Path) -> FrameSource:
    """The source a command line names.

    An existing folder is a :class:`StillsSource`, an existing file a :class:`RecordingSource`;
    otherwise an integer (or a string of digits) is a camera device index and a string with
    GStreamer's ``!`` a pipeline. Anything else is taken for a recording (and fails there,
    naming the missing file).
    """
    if isinstance(spec, int):
        return CameraSource(spec)
    path = Path(spec)
    if path.is_dir():
        return StillsSource(path)
    if path.exists():
        return RecordingSource(path)
    text = str(spec).strip()
    if text.isdigit():
        return CameraSource(int(text))
    if "!" in text:
        return CameraSource(text)
    return RecordingSource(path)
