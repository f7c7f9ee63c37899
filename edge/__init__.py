"""Diff-Fastener Edge: rail-fastener inspection on a track-inspection vehicle.

The package is laid out as the pipeline runs: ``grabber`` (frames to fastener crops),
``engine`` (crops to anomaly maps and scores), ``publisher`` (scores to alarms over ZeroMQ),
under ``pipeline`` (the supervisor). ``model`` and ``diffusion`` hold the detector itself;
``train`` and ``evaluate`` are office work. Imports flow one way:
cli -> pipeline -> (grabber, engine, publisher) -> model and maths.
"""

__version__ = "0.1.0"
