"""A replay scored against the known defects of its run (``edge-replay --truth FILE``).

A test run over track with planted defects, or a recording with edited fasteners such as the
bundled sample, comes with a truth file listing every fastener::

    {"fasteners": [{"rail": "left", "side": "field", "state": "missing",
                    "mileage_m": 27411.476, "along_track_m": 1.476}, ...]}

``state`` is ``normal`` or a defect kind. An alarm finds a defect when it is on the same rail
and side and within ``tolerance_m`` of it along the line (by mileage when both have one, else
by along-track distance); each alarm finds at most one defect and the nearest pairs are taken
first. Alarms that find no defect are false alarms, counted against the normal fasteners.
"""

from __future__ import annotations

import json
from pathlib import Path

from edge.errors import ConfigInvalidError

DEFAULT_TOLERANCE_M = 1.0


def load_truth(path: Path) -> list[dict]:
    """The fasteners of a truth file; raises :class:`ConfigInvalidError` naming the file."""
    try:
        fasteners = json.loads(path.read_text(encoding="utf-8"))["fasteners"]
        for fastener in fasteners:
            for key in ("rail", "side", "state"):
                if not isinstance(fastener[key], str):
                    raise TypeError(f"{key} is not a string")
            if "mileage_m" not in fastener and "along_track_m" not in fastener:
                raise KeyError("mileage_m or along_track_m")
    except OSError as error:
        raise ConfigInvalidError(f"{path}: cannot read the truth file ({error})") from error
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigInvalidError(
            f"{path}: not a truth file (need fasteners with rail, side, state and mileage_m "
            f"or along_track_m; {error!r})"
        ) from error
    return fasteners


def _distance_m(alarm: dict, fastener: dict) -> float | None:
    if alarm.get("mileage_m") is not None and fastener.get("mileage_m") is not None:
        return abs(alarm["mileage_m"] - fastener["mileage_m"])
    if fastener.get("along_track_m") is not None:
        return abs(alarm["along_track_m"] - fastener["along_track_m"])
    return None


SPAN_MARGIN_M = 0.25  # a crop's position error is millimetres; clips on one sleeper share it


def inspected_span(scores: list[dict]) -> dict[str, tuple[float, float]]:
    """``{"mileage_m": (low, high), "along_track_m": (low, high)}`` of the scored crops (one
    acknowledgement per crop); a key is left out where no crop has it."""
    span = {}
    for key in ("mileage_m", "along_track_m"):
        values = [ack[key] for ack in scores if ack.get(key) is not None]
        if values:
            span[key] = (min(values), max(values))
    return span


def _inside(fastener: dict, span: dict[str, tuple[float, float]], margin_m: float) -> bool:
    for key in ("mileage_m", "along_track_m"):
        if fastener.get(key) is not None and key in span:
            low, high = span[key]
            return low - margin_m <= fastener[key] <= high + margin_m
    return True


def score_against_truth(
    alarms: list[dict],
    fasteners: list[dict],
    tolerance_m: float = DEFAULT_TOLERANCE_M,
    span: dict[str, tuple[float, float]] | None = None,
) -> dict:
    """Match alarm rows (:func:`edge.pipeline.report.alarm_row`) to the truth's defects.

    ``span`` (:func:`inspected_span`): the stretch the run scored. Truth fasteners more than
    :data:`SPAN_MARGIN_M` beyond it were not inspected (a recording cut short, or clips cut by
    its end, reported as a coverage gap): they count as ``not_inspected``, neither missed nor
    normal.

    Returns:
        ``defects``, ``found``, ``missed`` (the defects no alarm found), ``false_alarms`` (their
        ``seq``), ``normal_fasteners``, ``false_alarms_per_100_normal``, ``not_inspected`` and
        ``tolerance_m``.
    """
    listed = len(fasteners)
    if span:
        fasteners = [f for f in fasteners if _inside(f, span, SPAN_MARGIN_M)]
    defects = [fastener for fastener in fasteners if fastener["state"] != "normal"]
    pairs = []
    for d, defect in enumerate(defects):
        for a, alarm in enumerate(alarms):
            if (alarm["rail"], alarm["side"]) != (defect["rail"], defect["side"]):
                continue
            distance = _distance_m(alarm, defect)
            if distance is not None and distance <= tolerance_m:
                pairs.append((distance, d, a))
    found_by: dict[int, int] = {}
    used: set[int] = set()
    for _, d, a in sorted(pairs):
        if d not in found_by and a not in used:
            found_by[d] = a
            used.add(a)
    normal = len(fasteners) - len(defects)
    false_alarms = [alarm["seq"] for a, alarm in enumerate(alarms) if a not in used]
    return {
        "defects": len(defects),
        "found": len(found_by),
        "missed": [defects[d] for d in range(len(defects)) if d not in found_by],
        "false_alarms": false_alarms,
        "normal_fasteners": normal,
        "false_alarms_per_100_normal": 100.0 * len(false_alarms) / normal if normal else None,
        "not_inspected": listed - len(fasteners),
        "tolerance_m": tolerance_m,
    }


def truth_text(result: dict) -> str:
    """The score as lines a railway engineer reads at the end of a replay."""
    rate = result["false_alarms_per_100_normal"]
    lines = [
        f"  against the truth: {result['found']} of {result['defects']} defects found "
        f"(same rail and side, within {result['tolerance_m']:g} m), "
        f"{len(result['false_alarms'])} false alarms on {result['normal_fasteners']} normal "
        f"fasteners" + (f" ({rate:.1f} per 100)" if rate is not None else "")
    ]
    if result.get("not_inspected"):
        lines.append(
            f"    {result['not_inspected']} fasteners of the truth lie beyond the stretch "
            "inspected (not recorded, or cut by its end), not counted"
        )
    for defect in result["missed"]:
        if defect.get("mileage_m") is not None:
            km_post = int(defect["mileage_m"] // 1000)
            place = f"km {km_post} + {defect['mileage_m'] - 1000 * km_post:.2f} m"
        else:
            place = f"{defect['along_track_m']:.2f} m along the run"
        lines.append(
            f"    missed: {defect['state']} {defect['rail']} rail {defect['side']} side at {place}"
        )
    return "\n".join(lines)
