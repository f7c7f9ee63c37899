"""The run summary (from the spool) and the report folder of ``edge-replay --report DIR``.

The summary is read back from the spool, not from what the processes said: the spool is what
subscribers get, so an alarm in the summary is an alarm that was (or will be) published.

The report folder:

- ``index.html``: the run, then one row per alarm with its crop, the model's reconstruction
  and the heatmap overlay (PNG files under ``alarms/``), position and score;
- ``scores.png``: image score of every crop along the mileage, the threshold as a line and the
  alarms marked;
- ``alarms.csv`` and ``alarms.geojson`` (one Point per alarm, ``[lon, lat]``; null geometry
  where the alarm has no GPS position) with the same properties;
- ``crops.csv``: every crop, in along-track order, with its rail, side, mileage, score,
  ``scored`` (False where the model gave no usable score, e.g. NaN: that crop was not
  inspected) and alarm sequence number (empty when not an alarm), to compare runs over the same
  line or to see what another threshold would have raised;
- ``summary.json``: the summary ``edge-replay --json`` prints.
"""

from __future__ import annotations

import csv
import html
import json
from pathlib import Path

from edge.pipeline.publisher_process import report_image_path
from edge.pipeline.truth import truth_text
from edge.publisher.spool import Spool

CSV_FIELDS = (
    "seq",
    "crop_id",
    "rail",
    "side",
    "km_post",
    "metres",
    "mileage_m",
    "line_id",
    "along_track_m",
    "lat",
    "lon",
    "gps_quality",
    "capture_time_utc",
    "image_score",
    "threshold",
    "model_id",
)


def read_spooled(spool_path: Path, vehicle_id: str, run_id: str, topic: str) -> list[tuple]:
    """``[(body dict, heatmap png or None)]`` of one run's ``topic`` in sequence order."""
    out: list[tuple] = []
    with Spool(spool_path, synchronous="NORMAL") as spool:
        next_seq = 1
        while batch := spool.read_from(topic, vehicle_id, run_id, next_seq, limit=1000):
            out += [(json.loads(message.body), message.heatmap_png) for message in batch]
            next_seq = batch[-1].seq + 1
    return out


CROP_CSV_FIELDS = (
    "crop_id",
    "rail",
    "side",
    "along_track_m",
    "mileage_m",
    "score",
    "scored",
    "seq",
)


def alarm_row(body: dict) -> dict:
    """One alarm message as a flat row (:data:`CSV_FIELDS`)."""
    mileage = body.get("mileage") or {}
    return {
        "seq": body["seq"],
        "crop_id": body["crop"]["crop_id"],
        "rail": body["rail"],
        "side": body["side"],
        "km_post": mileage.get("km_post"),
        "metres": None if not mileage else round(mileage["metres"], 3),
        "mileage_m": mileage.get("mileage_m"),
        "line_id": mileage.get("line_id"),
        "along_track_m": round(body["along_track_m"], 3),
        "lat": body["gps"]["lat"],
        "lon": body["gps"]["lon"],
        "gps_quality": body["gps"]["fix_quality"],
        "capture_time_utc": body["capture_time"]["utc"],
        "image_score": body["image_score"],
        "threshold": body["threshold"],
        "model_id": body["model_id"],
    }


def gap_row(body: dict) -> dict:
    def point(end: dict) -> dict:
        mileage = end.get("mileage") or {}
        return {
            "along_track_m": round(end["along_track_m"], 3),
            "km_post": mileage.get("km_post"),
            "metres": None if not mileage else round(mileage["metres"], 3),
        }

    return {
        "seq": body["seq"],
        "reason": body["reason"],
        "crops_dropped": body["crops_dropped"],
        "start": point(body["start"]),
        "end": point(body["end"]),
        "detail": body["detail"],
    }


def gap_place(point: dict) -> str:
    """One end of a :func:`gap_row` as a railway engineer reads it."""
    if point["km_post"] is None:
        return f"{point['along_track_m']:.2f} m along the run"
    return f"km {point['km_post']} + {point['metres']:.2f} m"


def write_report(
    folder: Path, summary: dict, alarms: list[tuple], scores: list[dict], threshold: float
) -> Path:
    """Write the report folder (module docstring); returns ``index.html``.

    Args:
        summary: what ``edge-replay --json`` prints.
        alarms: ``[(alarm body, heatmap png or None)]`` from the spool.
        scores: one acknowledgement per crop (``score``, ``mileage_m``, ``along_track_m``,
            ``seq``), from the supervisor.
    """
    folder = Path(folder)
    (folder / "alarms").mkdir(parents=True, exist_ok=True)
    rows = [alarm_row(body) for body, _ in alarms]
    images = []
    for (_, heatmap), row in zip(alarms, rows):
        crop_id = row["crop_id"]
        found = {}
        for kind in ("crop", "reconstruction", "heatmap"):
            path = report_image_path(folder, crop_id, kind)
            if not path.exists() and kind == "heatmap" and heatmap:
                path.write_bytes(heatmap)
            if path.exists():
                found[kind] = path.relative_to(folder).as_posix()
        images.append(found)
    _write_csv(folder / "alarms.csv", rows)
    _write_crops_csv(folder / "crops.csv", scores)
    _write_geojson(folder / "alarms.geojson", rows, summary)
    _plot_scores(folder / "scores.png", scores, threshold)
    (folder / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    index = folder / "index.html"
    index.write_text(_html(summary, rows, images), encoding="utf-8")
    return index


def _write_csv(path: Path, rows: list[dict], fields: tuple[str, ...] = CSV_FIELDS) -> None:
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def _write_crops_csv(path: Path, scores: list[dict]) -> None:
    rows = [{"crop_id": ack["id"], "scored": ack["ok"], **ack} for ack in scores]
    rows.sort(key=lambda row: (row["along_track_m"], row["crop_id"]))
    _write_csv(path, rows, CROP_CSV_FIELDS)


def _write_geojson(path: Path, rows: list[dict], summary: dict) -> None:
    features = []
    for row in rows:
        geometry = None
        if row["lat"] is not None and row["lon"] is not None:
            geometry = {"type": "Point", "coordinates": [row["lon"], row["lat"]]}
        features.append({"type": "Feature", "geometry": geometry, "properties": row})
    collection = {
        "type": "FeatureCollection",
        "properties": {"recording": summary["recording"], **summary["run"]},
        "features": features,
    }
    path.write_text(json.dumps(collection, indent=1) + "\n", encoding="utf-8")


def _plot_scores(path: Path, scores: list[dict], threshold: float) -> None:
    """Image score along the mileage (km), threshold line, alarms marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(10, 3.5), dpi=100)
    usable = [s for s in scores if s["score"] is not None]
    use_mileage = all(s["mileage_m"] is not None for s in usable)

    def where(entry: dict) -> float:
        return entry["mileage_m"] / 1000 if use_mileage else entry["along_track_m"]

    normal = [s for s in usable if s["seq"] is None]
    alarm = [s for s in usable if s["seq"] is not None]
    axes.scatter([where(s) for s in normal], [s["score"] for s in normal], s=6, label="crop")
    axes.scatter(
        [where(s) for s in alarm],
        [s["score"] for s in alarm],
        s=40,
        marker="x",
        color="red",
        label="alarm",
    )
    axes.axhline(threshold, color="black", linestyle="--", linewidth=1, label="threshold")
    axes.set_xlabel("mileage (km)" if use_mileage else "along track (m)")
    axes.set_ylabel("image score")
    # Outside the axes, so no crop near the threshold hides behind it.
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, borderaxespad=0)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)


def _html(summary: dict, rows: list[dict], images: list[dict]) -> str:
    e = html.escape
    head = (
        f"<h1>Fastener alarms: {e(summary['run']['vehicle_id'])} / "
        f"{e(summary['run']['run_id'])}</h1>\n"
        f"<p>Recording <code>{e(summary['recording'])}</code>: {summary['frames']} frames, "
        f"{summary['crops']} crops, {len(rows)} alarms, {len(summary['coverage_gaps'])} "
        f"coverage gaps; {summary['crops_per_second']:.1f} crops/s with "
        f"{e(summary['backend'].get('backend', ''))} on {e(summary['backend'].get('device', ''))}; "
        f"model {e(str(summary['model_id']))}, threshold {summary['threshold']:.4g}.</p>\n"
        + "".join(
            f'<p style="color:#b00"><strong>Warning:</strong> {e(warning)}</p>\n'
            for warning in summary.get("warnings", [])
        )
        + "".join(
            f"<p>Coverage gap #{gap['seq']} ({e(gap['reason'])}, {gap['crops_dropped']} crops): "
            f"{e(gap_place(gap['start']))} to {e(gap_place(gap['end']))}"
            + (f": {e(gap['detail'])}" if gap["detail"] else "")
            + "</p>\n"
            for gap in summary["coverage_gaps"]
        )
        + (
            f"<pre>{e(truth_text(summary['truth']).strip())}</pre>\n"
            if summary.get("truth")
            else ""
        )
        + '<p><img src="scores.png" alt="image score along the mileage"></p>\n'
        '<p><a href="alarms.csv">alarms.csv</a> · <a href="alarms.geojson">alarms.geojson</a> · '
        '<a href="crops.csv">crops.csv</a>'
        ' · <a href="summary.json">summary.json</a></p>\n'
    )
    cells = []
    for row, found in zip(rows, images):
        pictures = "".join(
            f'<td><img src="{e(found[kind])}" alt="{kind}" width="128"></td>'
            if kind in found
            else "<td>-</td>"
            for kind in ("crop", "reconstruction", "heatmap")
        )
        place = "-" if row["km_post"] is None else f"km {row['km_post']} + {row['metres']:.2f} m"
        gps = "-" if row["lat"] is None else f"{row['lat']:.6f}, {row['lon']:.6f}"
        cells.append(
            f"<tr><td>{row['seq']}</td><td>{e(row['rail'])}</td><td>{e(row['side'])}</td>"
            f"<td>{e(place)}</td><td>{e(gps)}</td><td>{row['image_score']:.3f}</td>"
            f"{pictures}</tr>"
        )
    table = (
        "<table>\n<tr><th>seq</th><th>rail</th><th>side</th><th>mileage</th><th>GPS</th>"
        "<th>score</th><th>crop</th><th>reconstruction</th><th>heatmap</th></tr>\n"
        + "\n".join(cells)
        + "\n</table>\n"
    )
    style = (
        "<style>body{font-family:sans-serif;margin:2em}td,th{padding:4px 8px;"
        "border-bottom:1px solid #ccc;text-align:left}img{image-rendering:pixelated}</style>"
    )
    return (
        f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>alarms {e(summary['run']['run_id'])}</title>{style}</head>\n<body>\n"
        f"{head}{table}</body></html>\n"
    )
