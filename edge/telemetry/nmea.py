"""NMEA 0183 telemetry (RMC, GGA, VTG, ZDA): strict reading into epochs, and writing.

pynmea2 frames each sentence and checks its checksum; the fields are then read here, strictly,
because a wrong sign or a wrong day in an alarm sends a maintenance crew to the wrong place:

1. The line must start with ``$`` and carry a checksum that matches (pynmea2, ``check=True``).
2. The field count must be one the standard allows for the sentence (RMC 11-13, GGA 14,
   VTG 8-9, ZDA 6); a sentence cut short can still pass the weak XOR checksum.
3. Every value is range-checked: time of day, date, degrees and minutes, speed, course, fix
   quality. Latitude and longitude are read as ``[d]ddmm.mmmm``: the last two integer digits
   are minutes and everything before them degrees, so a receiver that writes latitude with
   three degree digits (``04807.038``) reads right. (pynmea2's ``latitude`` property assumes
   exactly two degree digits, so it is not used.) South and west are negative.
4. A coordinate with an empty hemisphere field makes the fix invalid; the sentence's time and
   date are kept (they still date other sentences) and the line is counted as invalidated.
5. GGA carries a time of day but no date. It is dated from the nearest dated sentence (RMC or
   ZDA) in the file: of the day before, the same day and the day after, the one that puts the
   GGA closest in time to that sentence wins. So a GGA at 23:59:59 followed by an RMC of the
   next day at 00:00:00 gets the earlier day. This is right as long as the nearest dated
   sentence is within 12 hours, which a receiver logging at 1-10 Hz always gives.
6. Sentences of one instant (same time to the millisecond) merge into one epoch; the fix is
   valid only if every position sentence of the instant says so (RMC status ``A`` and mode not
   ``N``, GGA quality above 0). VTG has no time: it belongs to the timed sentence before it.

Lines that fail a check are skipped and counted by reason; nothing here raises on bad input.
Known limit: a GPS week rollover (1024 weeks; the last on 2019-04-06) in an old receiver gives
dates 19.6 years early; :class:`~edge.telemetry.position.Positioner` warns when the telemetry
is far from the run's start time, but nothing here corrects it.
"""

from __future__ import annotations

import bisect
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path

import pynmea2

from edge.telemetry.epochs import GpsEpoch, TelemetryLog

KNOT_M_S = 1852.0 / 3600.0
MAX_SPEED_KMH = 1000.0  # faster than any train; a larger value is a corrupt field
FIELD_COUNTS = {"RMC": (11, 12, 13), "GGA": (14,), "VTG": (8, 9), "ZDA": (6,)}
# RMC/VTG mode indicator (NMEA 2.3+) -> GGA fix quality. "N" is "data not valid".
MODE_QUALITY = {"A": 1, "D": 2, "P": 3, "R": 4, "F": 5, "E": 6, "M": 7, "S": 8, "N": 0}
QUALITY_MODE = {1: "A", 2: "D", 3: "P", 4: "R", 5: "F", 6: "E", 7: "M", 8: "S"}

_COORDINATE = re.compile(r"^(\d{1,3})(\d{2}(?:\.\d*)?)$")
_TIME = re.compile(r"^(\d{2})(\d{2})(\d{2}(?:\.\d+)?)$")


class _Bad(Exception):
    """A field failed its check; ``reason`` is the counter key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class _NoHemisphere(Exception):
    """A coordinate was given without its N/S or E/W field."""


@dataclass
class _Sentence:
    """One checked RMC, GGA or ZDA line before dating. ``tod_s``: seconds of the UTC day."""

    line_no: int
    kind: str
    tod_s: float
    day: date | None = None
    has_position: bool = False
    lat: float | None = None
    lon: float | None = None
    valid: bool = False
    quality: int = 0
    speed_m_s: float | None = None
    course_deg: float | None = None
    time_s: float | None = None  # UTC epoch seconds, once dated


def _time_of_day(text: str) -> float:
    match = _TIME.match(text)
    if not match:
        raise _Bad("time")
    hours, minutes, seconds = int(match[1]), int(match[2]), float(match[3])
    if hours > 23 or minutes > 59 or seconds >= 61.0:  # 60.x is a leap second
        raise _Bad("time")
    return 3600.0 * hours + 60.0 * minutes + seconds


def _date(day: str, month: str, year: str) -> date:
    try:
        return date(int(year), int(month), int(day))
    except ValueError as error:
        raise _Bad("date") from error


def _date_ddmmyy(text: str) -> date:
    if len(text) != 6 or not text.isdigit():
        raise _Bad("date")
    yy = int(text[4:])
    # Two-digit years: GPS began in 1980, so 80-99 are 19xx and 00-79 are 20xx.
    return _date(text[:2], text[2:4], str(1900 + yy if yy >= 80 else 2000 + yy))


def _coordinate(value: str, hemisphere: str, axis: str) -> float | None:
    """Decimal degrees from ``[d]ddmm.mmmm`` and its hemisphere; ``None`` when both are empty."""
    if not value:
        return None
    if not hemisphere:
        raise _NoHemisphere
    allowed, limit = (("N", "S"), 90.0) if axis == "latitude" else (("E", "W"), 180.0)
    match = _COORDINATE.match(value)
    if hemisphere not in allowed or not match:
        raise _Bad(axis)
    degrees, minutes = int(match[1]), float(match[2])
    decimal = degrees + minutes / 60.0
    if minutes >= 60.0 or decimal > limit:
        raise _Bad(axis)
    return -decimal if hemisphere == allowed[1] else decimal


def _number(text: str, reason: str, low: float, high: float) -> float | None:
    if not text:
        return None
    try:
        value = float(text)
    except ValueError as error:
        raise _Bad(reason) from error
    if not low <= value <= high:
        raise _Bad(reason)
    return value


def _position(fields: list[str], first: int) -> tuple[float | None, float | None, bool]:
    """(lat, lon, hemisphere_missing) from the four fields at ``first``."""
    try:
        lat = _coordinate(fields[first], fields[first + 1], "latitude")
        lon = _coordinate(fields[first + 2], fields[first + 3], "longitude")
    except _NoHemisphere:
        return None, None, True
    if (lat is None) != (lon is None):
        raise _Bad("position")
    return lat, lon, False


def _rmc(fields: list[str], line_no: int) -> tuple[_Sentence, bool]:
    status = fields[1]
    if status not in ("A", "V"):
        raise _Bad("status")
    mode = fields[11] if len(fields) > 11 else ""
    if mode and mode not in MODE_QUALITY:
        raise _Bad("status")
    lat, lon, no_hemisphere = _position(fields, 2)
    knots = _number(fields[6], "speed", 0.0, MAX_SPEED_KMH / 1.852)
    sentence = _Sentence(
        line_no,
        "RMC",
        _time_of_day(fields[0]),
        day=_date_ddmmyy(fields[8]),
        has_position=True,
        lat=lat,
        lon=lon,
        quality=MODE_QUALITY.get(mode, 1) if status == "A" else 0,
        speed_m_s=None if knots is None else knots * KNOT_M_S,
        course_deg=_number(fields[7], "course", 0.0, 360.0),
    )
    sentence.valid = sentence.quality > 0 and lat is not None and not no_hemisphere
    return sentence, no_hemisphere


def _gga(fields: list[str], line_no: int) -> tuple[_Sentence, bool]:
    lat, lon, no_hemisphere = _position(fields, 1)
    quality = _number(fields[5], "quality", 0, 8)
    if quality is None or quality != int(quality):
        raise _Bad("quality")
    sentence = _Sentence(
        line_no,
        "GGA",
        _time_of_day(fields[0]),
        has_position=True,
        lat=lat,
        lon=lon,
        quality=int(quality),
    )
    sentence.valid = sentence.quality > 0 and lat is not None and not no_hemisphere
    return sentence, no_hemisphere


def _zda(fields: list[str], line_no: int) -> _Sentence:
    if not (fields[1].isdigit() and fields[2].isdigit() and len(fields[3]) == 4):
        raise _Bad("date")
    return _Sentence(
        line_no, "ZDA", _time_of_day(fields[0]), day=_date(fields[1], fields[2], fields[3])
    )


def _vtg(fields: list[str]) -> tuple[float | None, float | None]:
    """(speed m/s, course deg) of a VTG; both ``None`` when its mode says not valid."""
    if len(fields) > 8 and fields[8] == "N":
        return None, None
    kmh = _number(fields[6], "speed", 0.0, MAX_SPEED_KMH)
    knots = _number(fields[4], "speed", 0.0, MAX_SPEED_KMH / 1.852)
    course = _number(fields[0], "course", 0.0, 360.0)
    if kmh is not None:
        return kmh / 3.6, course
    return (None if knots is None else knots * KNOT_M_S), course


def _at(day: date, tod_s: float) -> datetime:
    return datetime.combine(day, time(tzinfo=timezone.utc)) + timedelta(seconds=tod_s)


def _date_sentences(
    sentences: list[_Sentence], date_hint: datetime | None, skipped: Counter[str]
) -> list[_Sentence]:
    """Give every sentence a UTC epoch time (step 5 of the module docstring)."""
    anchors = [s for s in sentences if s.day is not None]
    anchor_lines = [s.line_no for s in anchors]
    dated = []
    for sentence in sentences:
        if sentence.day is not None:
            sentence.time_s = _at(sentence.day, sentence.tod_s).timestamp()
            dated.append(sentence)
            continue
        if anchors:
            k = bisect.bisect_left(anchor_lines, sentence.line_no)
            near = [anchors[i] for i in (k - 1, k) if 0 <= i < len(anchors)]
            anchor = min(near, key=lambda a: (abs(a.line_no - sentence.line_no), a.line_no))
            reference = _at(anchor.day, anchor.tod_s)
        elif date_hint is not None:
            reference = date_hint.astimezone(timezone.utc)
        else:
            skipped["undated"] += 1
            continue
        candidates = [_at(reference.date() + timedelta(days=k), sentence.tod_s) for k in (-1, 0, 1)]
        sentence.time_s = min(candidates, key=lambda c: abs(c - reference)).timestamp()
        dated.append(sentence)
    return dated


def _merge(sentences: list[_Sentence], vtg: dict[int, tuple]) -> list[GpsEpoch]:
    """One epoch per instant (step 6): GGA position and quality first, RMC speed first."""
    groups: dict[int, list[_Sentence]] = {}
    for sentence in sentences:
        groups.setdefault(round(sentence.time_s * 1000.0), []).append(sentence)
    epochs = []
    for key in sorted(groups):
        group = groups[key]
        located = [s for s in group if s.has_position]
        if not located:
            continue
        main = next((s for s in located if s.kind == "GGA"), located[0])
        valid = all(s.valid for s in located)
        speed = next((s.speed_m_s for s in located if s.speed_m_s is not None), None)
        course = next((s.course_deg for s in located if s.course_deg is not None), None)
        for s in group:
            vtg_speed, vtg_course = vtg.get(s.line_no, (None, None))
            speed = vtg_speed if speed is None else speed
            course = vtg_course if course is None else course
        epochs.append(
            GpsEpoch(
                time_s=key / 1000.0,
                lat=main.lat if valid else None,
                lon=main.lon if valid else None,
                quality=main.quality if valid else 0,
                speed_m_s=speed if valid else None,
                course_deg=course if valid else None,
            )
        )
    return epochs


def parse_nmea(
    lines: Iterable[str], source: str | Path = "<nmea>", date_hint: datetime | None = None
) -> TelemetryLog:
    """Epochs from NMEA lines, with bad lines counted by reason (module docstring, steps 1-6).

    Args:
        lines: the text lines of an NMEA log, in the order the receiver sent them.
        source: the file name, for the log and for messages.
        date_hint: dates GGA sentences when the file has no RMC or ZDA at all (the run's start
            time is a good hint); without one such GGAs are skipped as ``undated``.
    """
    skipped: Counter[str] = Counter()
    invalidated: Counter[str] = Counter()
    sentences: list[_Sentence] = []
    vtg: dict[int, tuple] = {}  # line of the timed sentence before the VTG -> (speed, course)
    count = 0
    for line_no, raw in enumerate(lines):
        line = raw.strip()
        if not line:
            continue
        count += 1
        try:
            if not line.startswith("$"):
                raise _Bad("framing")
            try:
                message = pynmea2.parse(line, check=True)
            except pynmea2.ChecksumError as error:
                raise _Bad("checksum_missing" if "missing" in str(error) else "checksum") from None
            except pynmea2.SentenceTypeError:
                raise _Bad("unknown_sentence") from None
            except pynmea2.ParseError:
                raise _Bad("framing") from None
            kind = getattr(message, "sentence_type", "")
            if kind not in FIELD_COUNTS:
                skipped["other_sentence"] += 1
                continue
            fields = list(message.data)
            if len(fields) not in FIELD_COUNTS[kind]:
                raise _Bad("field_count")
            no_hemisphere = False
            if kind == "RMC":
                sentence, no_hemisphere = _rmc(fields, line_no)
            elif kind == "GGA":
                sentence, no_hemisphere = _gga(fields, line_no)
            elif kind == "ZDA":
                sentence = _zda(fields, line_no)
            else:
                speed_course = _vtg(fields)
                if not sentences:
                    raise _Bad("untimed")
                vtg[sentences[-1].line_no] = speed_course
                continue
        except _Bad as bad:
            skipped[bad.reason] += 1
            continue
        if no_hemisphere:
            invalidated["hemisphere_missing"] += 1
        sentences.append(sentence)
    epochs = _merge(_date_sentences(sentences, date_hint, skipped), vtg)
    return TelemetryLog(Path(source), epochs, count, skipped, invalidated)


def read_nmea(path: str | Path, date_hint: datetime | None = None) -> TelemetryLog:
    """Read an NMEA file (one sentence a line, CR LF or LF) with :func:`parse_nmea`.

    Raises:
        OSError: the file cannot be read (the caller names the recording it belongs to).
    """
    path = Path(path)
    with path.open("r", encoding="ascii", errors="replace") as handle:
        return parse_nmea(handle, source=path, date_hint=date_hint)


# Writing -------------------------------------------------------------------------------------


def _format_coordinate(value: float, degree_digits: int, hemispheres: str) -> tuple[str, str]:
    """``ddmm.mmmmm`` (or ``dddmm.mmmmm``) and its hemisphere letter; 1e-5 minute ~ 2 cm."""
    units = round(abs(value) * 60 * 100_000)  # 1e-5 minutes, integer so minutes never read 60
    degrees, rest = divmod(units, 60 * 100_000)
    minutes, fraction = divmod(rest, 100_000)
    text = f"{degrees:0{degree_digits}d}{minutes:02d}.{fraction:05d}"
    return text, hemispheres[1] if value < 0 else hemispheres[0]


def nmea_sentences(epoch: GpsEpoch, talker: str = "GP", zda: bool = False) -> list[str]:
    """RMC, GGA and VTG (and ZDA if asked) for one epoch, each with ``$`` and checksum.

    An epoch without a fix gives RMC status ``V`` and mode ``N``, GGA quality 0 and empty
    position fields, as a receiver in a tunnel writes them. Times are rounded to 10 ms.
    """
    centiseconds = round(epoch.time_s * 100)
    instant = datetime.fromtimestamp(centiseconds // 100, timezone.utc)
    hhmmss = f"{instant:%H%M%S}.{centiseconds % 100:02d}"
    ddmmyy = f"{instant:%d%m%y}"
    if epoch.has_fix:
        lat, ns = _format_coordinate(epoch.lat, 2, "NS")
        lon, ew = _format_coordinate(epoch.lon, 3, "EW")
        speed = epoch.speed_m_s or 0.0
        knots, kmh = f"{speed / KNOT_M_S:.3f}", f"{speed * 3.6:.3f}"
        course = "" if epoch.course_deg is None else f"{epoch.course_deg:.2f}"
        mode = QUALITY_MODE.get(epoch.quality, "A")
        rmc = (hhmmss, "A", lat, ns, lon, ew, knots, course, ddmmyy, "", "", mode)
        gga = (hhmmss, lat, ns, lon, ew, str(epoch.quality), "10", "0.9", "50.0", "M", "0.0", "M")
        vtg = (course, "T", "", "M", knots, "N", kmh, "K", mode)
    else:
        rmc = (hhmmss, "V", "", "", "", "", "", "", ddmmyy, "", "", "N")
        gga = (hhmmss, "", "", "", "", "0", "00", "", "", "M", "", "M")
        vtg = ("", "T", "", "M", "", "N", "", "K", "N")
    messages = [
        pynmea2.RMC(talker, "RMC", rmc),
        pynmea2.GGA(talker, "GGA", (*gga, "", "")),
        pynmea2.VTG(talker, "VTG", vtg),
    ]
    if zda:
        zone = ("00", "00")
        messages.append(
            pynmea2.ZDA(
                talker, "ZDA", (hhmmss, f"{instant:%d}", f"{instant:%m}", f"{instant:%Y}", *zone)
            )
        )
    return [str(message) for message in messages]


def write_nmea(epochs: Iterable[GpsEpoch], path: str | Path, talker: str = "GP") -> int:
    """Write epochs as NMEA (CR LF line ends), a ZDA at every whole second; returns lines."""
    count = 0
    with Path(path).open("w", encoding="ascii", newline="") as handle:
        for epoch in epochs:
            whole_second = round(epoch.time_s * 100) % 100 == 0
            for sentence in nmea_sentences(epoch, talker, zda=whole_second):
                handle.write(sentence + "\r\n")
                count += 1
    return count
