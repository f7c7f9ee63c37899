"""``edge-replay run.mkv``: the whole pipeline on a recorded run, with a summary and a report.

Defaults that make ``edge-replay samples/track-demo/run.mkv`` work from the repository root:

- the model: ``--model``, else the file named by ``engines/default.json``
  (``{"model": "NAME.onnx"}``, relative to ``engines/``), else the only ``.onnx`` in
  ``engines/``; the backend follows the suffix (``.onnx`` onnxruntime on the CPU, ``.pt``
  torch, ``.plan`` tensorrt) unless ``--backend`` says otherwise;
- geometry and thresholds: ``CALIBRATION/<vehicle_id>/<camera_id>.geometry.json`` and
  ``.thresholds.json``, vehicle and camera from the recording's ``run.json``
  (``--calibration`` defaults to ``calibration``);
- publishing: without ``--publish`` the publisher still spools (to a fresh
  ``REPORT/spool.db`` with ``--report``, else to a temporary file) and binds an ipc socket
  nobody reads. An explicit ``--spool`` that already holds this run (vehicle and run id of
  ``run.json``) continues it: alarms already spooled are not raised again. With
  ``--publish tcp://HOST:PORT`` it binds there, and its replay endpoint on PORT + 1 unless
  ``--replay-endpoint`` says otherwise.

The replay is lossless (the grabber waits for the engine), as fast as the engine allows, or
paced to the recording with ``--realtime``. Each alarm is printed as it is spooled (stdout;
stderr with ``--json``), then a summary read back from the spool; ``--json`` prints the
summary as one JSON object on stdout. Logs are JSON lines on stderr (level
``$EDGE_LOG_LEVEL``, default warning here so the progress bar stays readable). With
``--truth FILE`` the alarms are also scored against the run's known fasteners
(:mod:`edge.pipeline.truth`): defects found and missed, false alarms per 100 normal fasteners.

Exit statuses (edge/errors.py): 0 done; 3 the recording is cut short (after every complete
frame was processed and summarised); 4 no fastener found; 5 run.json or telemetry missing;
6 model missing or corrupt; 7 recording unreadable; 8 calibration or config invalid; 11 the
pipeline failed (a child restarted too often); 130 interrupted (Ctrl-C).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from edge.argtypes import positive_float, positive_int
from edge.errors import (
    ConfigInvalidError,
    EdgeError,
    InputUnreadableError,
    ModelInvalidError,
    NoFastenersError,
    RecordingTruncatedError,
    check_output_folder,
)
from edge.logs import configure, get_logger
from edge.pipeline.cpus import parse_cpu_list
from edge.pipeline.report import alarm_row, gap_place, gap_row, read_spooled, write_report
from edge.pipeline.settings import (
    LOCAL_ENDPOINT,
    EngineSettings,
    GrabberSettings,
    PipelineSettings,
    PublisherSettings,
)
from edge.pipeline.supervisor import RunOutcome, Supervisor
from edge.pipeline.truth import inspected_span, load_truth, score_against_truth, truth_text
from edge.publisher.replay import replay_endpoint_for
from edge.publisher.schema import ALARM_TOPIC, COVERAGE_TOPIC
from edge.publisher.spool import check_spool
from edge.publisher.thresholds import thresholds_path, thresholds_warnings
from edge.telemetry.epochs import QUALITY_DEAD_RECKONING
from edge.telemetry.position import load_run_info

log = get_logger(__name__)

BACKEND_BY_SUFFIX = {".onnx": "onnxruntime", ".pt": "torch", ".plan": "tensorrt"}
INTERRUPTED = 130


def default_model(engines: Path = Path("engines")) -> Path:
    """The model ``edge-replay`` uses without ``--model`` (module docstring).

    Raises:
        ModelInvalidError: no pointer and not exactly one ``.onnx`` in ``engines``.
    """
    pointer = engines / "default.json"
    if pointer.is_file():
        try:
            name = json.loads(pointer.read_text(encoding="utf-8"))["model"]
        except (ValueError, KeyError, TypeError) as error:
            raise ModelInvalidError(f'{pointer}: expected {{"model": "NAME.onnx"}}') from error
        return engines / name
    graphs = sorted(engines.glob("*.onnx"))
    if len(graphs) != 1:
        found = ", ".join(path.name for path in graphs) or "none"
        raise ModelInvalidError(
            f"{engines}/: no default model (ONNX graphs there: {found}); pass --model or name "
            f'one in {pointer} as {{"model": "NAME.onnx"}}'
        )
    return graphs[0]


EXIT_STATUSES = """exit statuses:
  0  done                              6  model file missing or corrupt
  3  recording cut short (after every  7  recording missing or unreadable
     complete frame was processed)     8  calibration or config file invalid
  4  no fastener found                11  pipeline failed (restart limit)
  5  run.json or telemetry missing   130  interrupted (Ctrl-C)"""


def cpu_list(text: str) -> tuple[int, ...]:
    """An argparse type: a core list such as ``1`` or ``0,2-3`` (:mod:`edge.pipeline.cpus`)."""
    try:
        return parse_cpu_list(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.epilog = EXIT_STATUSES
    parser.add_argument("recording", type=Path, help="the run's .mkv (sidecars beside it)")
    parser.add_argument("--model", type=Path, help="default: engines/default.json or the .onnx")
    parser.add_argument(
        "--backend", choices=("onnxruntime", "torch", "tensorrt"), help="default: by suffix"
    )
    parser.add_argument("--device", help="cpu, cuda or cuda:N (default: the backend's)")
    parser.add_argument(
        "--calibration",
        type=Path,
        default=Path("calibration"),
        help="folder of VEHICLE/CAMERA.geometry.json and .thresholds.json (default calibration)",
    )
    parser.add_argument("--geometry", type=Path, help="default: CALIBRATION/VEHICLE/CAMERA...")
    parser.add_argument("--thresholds", type=Path, help="default: CALIBRATION/VEHICLE/CAMERA...")
    parser.add_argument("--publish", help="bind the alarm PUB here, e.g. tcp://*:5560")
    parser.add_argument("--replay-endpoint", help="bind the replay ROUTER here (default PORT+1)")
    parser.add_argument(
        "--wait-for-subscriber",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="before reading, wait up to this long for a first subscriber",
    )
    parser.add_argument(
        "--sndhwm",
        type=int,
        default=1000,
        help="alarms queued per subscriber before the PUB drops (they stay in the replay)",
    )
    parser.add_argument(
        "--serve-after",
        type=float,
        default=0.0,
        metavar="SECONDS",
        help="after the run, keep heartbeats and the replay endpoint up this long",
    )
    parser.add_argument("--report", type=Path, help="write the report folder here")
    parser.add_argument(
        "--truth",
        type=Path,
        help="the run's known fasteners (truth.json): count defects found, missed, false alarms",
    )
    parser.add_argument("--spool", type=Path, help="spool file (default: REPORT/ or temporary)")
    parser.add_argument(
        "--json",
        action="store_true",
        help="print the summary (or the error that stopped it) as one JSON document",
    )
    parser.add_argument("--realtime", action="store_true", help="pace to the recording")
    parser.add_argument(
        "--heatmap-vmax",
        type=positive_float,
        default=1.0,
        help="anomaly-map value drawn full red (1 for Diff-Fastener's probabilities)",
    )
    parser.add_argument("--max-batch", type=positive_int, default=8, help="crops per inference")
    parser.add_argument(
        "--max-in-flight",
        type=positive_int,
        default=64,
        help="crops between grabber and publisher",
    )
    parser.add_argument(
        "--engine-cpus",
        type=cpu_list,
        help="run the engine on these CPU cores (taskset style: 1 or 2-3) and grabber, "
        "publisher and supervisor on the others; the engine then uses one thread per core",
    )


def check_recording_file(recording: Path) -> None:
    """Raises :class:`InputUnreadableError` when ``recording`` is a folder or no file."""
    if recording.is_dir():
        raise InputUnreadableError(f"{recording}: a folder; name the recording in it (NAME.mkv)")
    if not recording.is_file():
        raise InputUnreadableError(f"{recording}: no such recording file")


def build_settings(args: argparse.Namespace, spool: Path) -> PipelineSettings:
    """The pipeline settings for a replay (module docstring), checking the files it names."""
    recording: Path = args.recording
    check_recording_file(recording)
    run = load_run_info(recording)
    model = args.model or default_model()
    if model.is_dir():
        raise ModelInvalidError(f"{model}: a folder; name the model in it (.onnx, .pt or .plan)")
    if not model.exists():
        raise ModelInvalidError(f"{model}: no such model file")
    backend = args.backend or BACKEND_BY_SUFFIX.get(model.suffix)
    if backend is None:
        raise ModelInvalidError(f"{model}: unknown model type; pass --backend")
    geometry = args.geometry or args.calibration / run.vehicle_id / f"{run.camera_id}.geometry.json"
    thresholds = args.thresholds or thresholds_path(args.calibration, run.vehicle_id, run.camera_id)
    given = {"geometry": args.geometry is not None, "thresholds": args.thresholds is not None}
    for path, what in ((geometry, "geometry"), (thresholds, "thresholds")):
        if path.is_dir():
            raise ConfigInvalidError(f"{path}: a folder, not a {what} file")
        if not path.is_file() and given[what]:
            raise ConfigInvalidError(f"{path}: the {what} file named by --{what} does not exist")
        if not path.is_file():
            raise ConfigInvalidError(
                f"{path}: no {what} file for vehicle {run.vehicle_id}, camera {run.camera_id} "
                f"(from {recording.with_suffix('.json').name}); pass --calibration or --{what}"
            )
    publish = args.publish or LOCAL_ENDPOINT
    replay = args.replay_endpoint or (replay_endpoint_for(args.publish) if args.publish else None)
    return PipelineSettings(
        mode="replay",
        grabber=GrabberSettings(
            source=str(recording),
            geometry=geometry,
            mode="replay",
            pace="realtime" if args.realtime else "none",
            max_in_flight=args.max_in_flight,
            max_batch=args.max_batch,
        ),
        engine=EngineSettings(
            model=model,
            backend=backend,
            device=args.device,
            max_batch=args.max_batch,
            thresholds=thresholds,
            report_images=args.report is not None,
            heatmap_vmax=args.heatmap_vmax,
        ),
        publisher=PublisherSettings(
            vehicle_id=run.vehicle_id,
            run_id=run.run_id,
            thresholds=thresholds,
            spool_path=spool,
            publish_endpoint=publish,
            replay_endpoint=replay,
            startup_hold_s=0.0,
            linger_ms=1000,
            sndhwm=args.sndhwm,
            wait_for_subscriber_s=args.wait_for_subscriber,
            report_dir=args.report,
        ),
        log_level=os.environ.get("EDGE_LOG_LEVEL", "warning"),
        serve_after_s=args.serve_after,
        engine_cpus=args.engine_cpus,
    )


def truncation_warning(recording: Path, outcome: RunOutcome) -> str | None:
    """A warning naming how far a cut-short recording was inspected: the position of the last
    crop scored in running order (mileage may run either way); None for a whole recording."""
    if not outcome.truncated:
        return None
    scored = [ack for ack in outcome.scores if ack.get("along_track_m") is not None]
    if not scored:
        reach = "no fastener before the cut"
    else:
        last = max(scored, key=lambda ack: ack["along_track_m"])
        if last.get("mileage_m") is not None:
            reach = f"up to km {_km(last['mileage_m'])}"
        else:
            reach = f"up to {last['along_track_m']:.2f} m along the run"
    if outcome.frames == 1:
        frames = "its 1 complete frame was"
    else:
        frames = f"its {outcome.frames} complete frames were"
    return (
        f"{recording} is cut short: only {frames} inspected ({reach}); whatever was recorded "
        "after the cut was not inspected"
    )


def dead_reckoning_warning(alarms: list[dict]) -> str | None:
    """A warning listing the alarms whose GPS position is dead-reckoned, not a fix (a tunnel, or
    telemetry that ends before the recording: :mod:`edge.telemetry.position`, step 3); None if
    every alarm has a fix. ``alarms`` are summary rows (:func:`edge.pipeline.report.alarm_row`).
    """
    estimated = [alarm for alarm in alarms if alarm["gps_quality"] == QUALITY_DEAD_RECKONING]
    if not estimated:
        return None
    listed = ", ".join(f"#{alarm['seq']}" for alarm in estimated)
    return (
        f"{len(estimated)} of {len(alarms)} alarms ({listed}) have a GPS position dead-reckoned "
        "from the distance travelled, not a fix (no fix near them: a tunnel, telemetry that "
        "ends before the recording, or a start_time_utc in run.json far from the telemetry's "
        "times, logged as telemetry_far_from_run_start); their mileage comes from the line "
        "count and holds"
    )


def _km(mileage_m: float) -> str:
    km_post = int(mileage_m // 1000)
    return f"{km_post} + {mileage_m - 1000 * km_post:.2f} m"


def alarm_line(ack: dict, threshold: float) -> str:
    """One alarm as a railway engineer reads it."""
    mileage = ack.get("mileage")
    if mileage:
        km_post = int(mileage["mileage_m"] // 1000)
        metres = round(mileage["mileage_m"] - 1000 * km_post, 3)  # as in the summary
        place = f"km {km_post} + {metres:7.2f} m"
    else:
        place = f"{ack['along_track_m']:.2f} m along the run"
    return (
        f"ALARM #{ack['seq']:<4} {place}  {ack['rail']:>5} rail, {ack['side']:<5} side  "
        f"score {ack['score']:.3f} (threshold {threshold:.3f})  crop {ack['id']}"
    )


def summarise(args, settings: PipelineSettings, outcome: RunOutcome, spool: Path) -> dict:
    """The summary, its alarms and gaps read back from the spool."""
    vehicle_id, run_id = settings.publisher.vehicle_id, settings.publisher.run_id
    alarms = [alarm_row(body) for body, _ in read_spooled(spool, vehicle_id, run_id, ALARM_TOPIC)]
    gaps = [gap_row(body) for body, _ in read_spooled(spool, vehicle_id, run_id, COVERAGE_TOPIC)]
    seconds = outcome.seconds
    return {
        "recording": str(args.recording),
        "run": {"vehicle_id": vehicle_id, "run_id": run_id},
        "frames": outcome.frames,
        "crops": outcome.crops,
        "alarms": alarms,
        "coverage_gaps": gaps,
        "crops_per_second": outcome.crops / seconds if seconds > 0 else 0.0,
        "engine_crops_per_second": (
            outcome.engine_crops / outcome.engine_infer_s if outcome.engine_infer_s > 0 else 0.0
        ),
        "seconds": round(seconds, 3),
        "backend": outcome.backend,
        "model_id": outcome.model_id,
        "threshold": outcome.threshold,
        "truncated": outcome.truncated,
        "restarts": outcome.restarts,
        "publish": outcome.publish_address if args.publish else None,
        "replay": outcome.replay_address if args.publish else None,
        "spool": str(spool) if args.spool or args.report else None,
        "report": str(args.report / "index.html") if args.report else None,
    }


def summary_text(summary: dict) -> str:
    backend = summary["backend"]
    lines = [
        f"edge-replay {summary['recording']} ({summary['run']['vehicle_id']}, "
        f"run {summary['run']['run_id']})",
        f"  frames {summary['frames']}, crops {summary['crops']}, alarms "
        f"{len(summary['alarms'])}, coverage gaps {len(summary['coverage_gaps'])}",
        f"  {summary['crops_per_second']:.1f} crops/s over {summary['seconds']:.2f} s "
        f"(engine {summary['engine_crops_per_second']:.1f} crops/s while inferring); "
        f"{backend.get('backend')} on {backend.get('device')} {backend.get('precision')}, "
        f"model {summary['model_id']}, threshold {summary['threshold']:.4g}",
    ]
    if summary["alarms"]:
        lines.append("  alarms:")
        for alarm in summary["alarms"]:
            place = (
                f"km {alarm['km_post']} + {alarm['metres']:7.2f} m"
                if alarm["km_post"] is not None
                else f"{alarm['along_track_m']:.2f} m"
            )
            lines.append(
                f"    #{alarm['seq']:<4} {alarm['rail']:>5} rail  {alarm['side']:<5} side  "
                f"{place}  score {alarm['image_score']:.3f}"
            )
    for gap in summary["coverage_gaps"]:
        lines.append(
            f"  coverage gap #{gap['seq']} ({gap['reason']}, {gap['crops_dropped']} crops): "
            f"{gap_place(gap['start'])} to {gap_place(gap['end'])}"
            + (f": {gap['detail']}" if gap["detail"] else "")
        )
    if summary.get("truth"):
        lines.append(truth_text(summary["truth"]))
    for warning in summary.get("warnings", []):
        lines.append(f"  WARNING: {warning}")
    if summary["report"]:
        lines.append(f"  report: {summary['report']}")
    return "\n".join(lines)


def _silence_stdout() -> None:
    """Point stdout at /dev/null once its reader has gone, so that nothing written later (nor
    Python's flush at exit) raises BrokenPipeError; the summary and alarms stay in the spool
    and the report."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)


def run(args: argparse.Namespace) -> int:
    """The replay (module docstring). With ``--json``, an error that stops it before there is a
    summary is printed on stdout too, as ``{"recording", "exit_status", "error"}``, so that a
    script reading stdout always gets one JSON document."""
    try:
        return _replay(args)
    except EdgeError as error:
        if args.json:
            failed = {
                "recording": str(args.recording),
                "exit_status": int(error.exit_status),
                "error": str(error),
            }
            print(json.dumps(failed))
        raise


def _replay(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    configure("replay", os.environ.get("EDGE_LOG_LEVEL", "warning"))
    temporary = None
    if args.spool is not None:
        spool = args.spool
    elif args.report is not None:
        spool = args.report / "spool.db"
    else:
        temporary = Path(tempfile.mkdtemp(prefix="edge-replay-"))
        spool = temporary / "spool.db"
    try:
        if args.report is not None:
            check_output_folder(args.report, "--report").mkdir(parents=True, exist_ok=True)
            if args.spool is None:  # a report is of one replay: no alarms of an earlier one
                for old in ("spool.db", "spool.db-wal", "spool.db-shm"):
                    (args.report / old).unlink(missing_ok=True)
                shutil.rmtree(args.report / "alarms", ignore_errors=True)
        check_output_folder(spool.parent, "--spool").mkdir(parents=True, exist_ok=True)
        settings = build_settings(args, spool)
        check_spool(spool, "--spool" if args.spool is not None else "the replay's spool")
        run_info = load_run_info(args.recording)
        warnings = thresholds_warnings(
            settings.engine.thresholds, run_info.vehicle_id, run_info.camera_id
        )
        for warning in warnings:
            log.warning("thresholds_warning", warning=warning)
            print(f"edge-replay: warning: {warning}", file=sys.stderr)
        truth = load_truth(args.truth) if args.truth is not None else None
        alarms_out = sys.stderr if args.json else sys.stdout
        bar = tqdm(unit="frame", file=sys.stderr, disable=None, dynamic_ncols=True)
        supervisor: Supervisor | None = None

        def on_alarm(ack: dict) -> None:
            nonlocal alarms_out
            if alarms_out is None:
                return
            try:
                tqdm.write(alarm_line(ack, supervisor.outcome.threshold), file=alarms_out)
                alarms_out.flush()
            except BrokenPipeError:  # the reader left (`| head`): the run and its report go on
                alarms_out = None
                _silence_stdout()

        def on_progress(frames: int, crops: int, alarms: int, total: int | None) -> None:
            if total and bar.total != total:
                bar.total = total
            bar.update(frames - bar.n)
            bar.set_postfix(crops=crops, alarms=alarms, refresh=False)

        supervisor = Supervisor(
            settings, on_alarm=on_alarm, on_progress=on_progress, keep_scores=True
        )
        try:
            outcome = supervisor.run()
        finally:
            bar.close()
        summary = summarise(args, settings, outcome, spool)
        if args.truth is not None:
            summary["truth"] = score_against_truth(
                summary["alarms"], truth, span=inspected_span(outcome.scores)
            )
        found = (
            truncation_warning(args.recording, outcome),
            dead_reckoning_warning(summary["alarms"]),
        )
        summary["warnings"] = warnings + [warning for warning in found if warning]
        error = _outcome_error(args.recording, outcome)
        summary["exit_status"] = int(error.exit_status) if error else 0
        summary["error"] = str(error) if error else None
        if outcome.stopped_by:
            summary["exit_status"] = INTERRUPTED
            summary["error"] = f"interrupted by {outcome.stopped_by}"
        if args.report is not None:
            write_report(
                args.report,
                summary,
                _spooled_alarms(settings, spool),
                outcome.scores,
                outcome.threshold,
            )
        try:
            print(json.dumps(summary) if args.json else summary_text(summary), flush=True)
        except BrokenPipeError:
            _silence_stdout()
        if outcome.stopped_by:
            print(f"edge-replay: {summary['error']}", file=sys.stderr)
            return INTERRUPTED
        if error is not None:  # the summary above says it too
            print(f"edge-replay: {error}", file=sys.stderr)
            return int(error.exit_status)
        return 0
    finally:
        if temporary is not None:
            shutil.rmtree(temporary, ignore_errors=True)


def _spooled_alarms(settings: PipelineSettings, spool: Path) -> list[tuple]:
    publisher = settings.publisher
    return read_spooled(spool, publisher.vehicle_id, publisher.run_id, ALARM_TOPIC)


def _outcome_error(recording: Path, outcome: RunOutcome) -> EdgeError | None:
    """What the run's end says about the recording (exit statuses 4 and 3)."""
    if outcome.stopped_by:
        return None
    if outcome.crops == 0:
        return NoFastenersError(
            f"{recording}: no fastener found in {outcome.frames} frames (is the geometry file "
            "right for this camera?)"
        )
    if outcome.truncated:
        return RecordingTruncatedError(
            f"{recording}: the recording is cut short; its {outcome.frames} complete frames "
            "were processed"
        )
    return None
