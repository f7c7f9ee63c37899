"""The ``edge`` command (one subcommand per job) and ``edge-replay``.

Each subcommand lives in the module that does the job; the module exposes
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Only the chosen
subcommand's module is imported, so ``edge --help`` starts fast and the vehicle never imports
what it does not run.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from edge.errors import EdgeError

# name -> (module, one-line help). The module provides add_arguments() and run().
COMMANDS: dict[str, tuple[str, str]] = {
    "model-info": ("edge.model.info", "parameters, GFLOP per crop and skip concatenations"),
    "train": ("edge.train", "train Diff-Fastener on normal crops"),
    "eval": ("edge.evaluate.run", "image/pixel AUROC, AUPRO, F1 on a test set"),
    "crossval": ("edge.evaluate.crossval", "k-fold cross-validation of training and eval"),
    "prepare-crops": (
        "edge.datasets.prepare",
        "aligned fastener crops from labelled top-down track images",
    ),
    "record": ("edge.grabber.record", "a recording (.mkv + sidecars) from stills or a strip"),
    "subscribe": ("edge.publisher.subscriber", "print alarms as JSON lines, gaps refetched"),
    "export": ("edge.engine.export", "the detector as one ONNX graph, with its metadata"),
    "bench": ("edge.bench", "speed and memory, side by side, as ratios"),
    "calibrate": ("edge.evaluate.calibrate", "fit a camera's alarm threshold on normal crops"),
    "build-engine": ("edge.engine.plan", "TensorRT plan from an ONNX graph, gated against ORT"),
    "run": ("edge.pipeline.service", "the live inspection service (systemd, --config FILE)"),
}


def _build_parser(prog: str, module_name: str, help_text: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description=help_text)
    importlib.import_module(module_name).add_arguments(parser)
    return parser


def _run_command(prog: str, name: str, argv: Sequence[str]) -> int:
    module_name, help_text = COMMANDS[name]
    parser = _build_parser(f"{prog} {name}", module_name, help_text)
    args = parser.parse_args(list(argv))
    try:
        return int(importlib.import_module(module_name).run(args) or 0)
    except EdgeError as error:
        print(f"{prog} {name}: {error}", file=sys.stderr)
        return int(error.exit_status)


def _usage(prog: str) -> str:
    width = max(len(name) for name in COMMANDS)
    lines = [f"usage: {prog} COMMAND [options]", "", "commands:"]
    lines += [f"  {name:<{width}}  {help_text}" for name, (_, help_text) in COMMANDS.items()]
    lines += ["", f"'{prog} COMMAND --help' describes one command."]
    lines += [
        "Replaying a recorded run through the pipeline is its own command: edge-replay RUN.mkv"
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edge``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in {"-h", "--help"}:
        print(_usage("edge"))
        return 0 if argv else 2
    if argv[0] == "--version":
        from edge import __version__

        print(__version__)
        return 0
    if argv[0] not in COMMANDS:
        print(f"edge: unknown command {argv[0]!r}\n\n{_usage('edge')}", file=sys.stderr)
        return 2
    return _run_command("edge", argv[0], argv[1:])


def replay_main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``edge-replay``: the whole pipeline on a recorded run."""
    argv = list(sys.argv[1:] if argv is None else argv)
    module_name = "edge.pipeline.replay"
    parser = argparse.ArgumentParser(
        prog="edge-replay", description="replay a recorded run through the pipeline"
    )
    importlib.import_module(module_name).add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return int(importlib.import_module(module_name).run(args) or 0)
    except EdgeError as error:
        print(f"edge-replay: {error}", file=sys.stderr)
        return int(error.exit_status)
