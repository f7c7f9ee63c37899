"""Which CPU cores each process of the pipeline runs on (Linux scheduler affinity).

By default every process may run on every core the service was given, and the kernel spreads
them. ``engine_cpus`` (``edge-replay --engine-cpus``, ``engine_cpus`` in the service config)
gives the engine cores of its own: the engine runs on those, the grabber, the publisher and
the supervisor on the remaining ones. Two uses:

- on the vehicle, the engine's feeding thread (TensorRT, CUDA launches) is never preempted by
  the grabber's frame decoding, nor the other way round;
- on a CPU-only machine it lays the pipeline out as on the vehicle, where the model runs on a
  device of its own: ``edge bench`` times the engine alone and inside the pipeline on the same
  cores, so their ratio measures what the pipeline costs, not how much CPU the grabber takes
  from a model that would be on a GPU.

Core lists are written as ``taskset -c`` and the kernel's cpulist files write them:
``"1"``, ``"2,3"``, ``"4-7"``, ``"0,2-3"``.

Known limit: ``os.sched_setaffinity`` exists on Linux only; elsewhere a pinning request is a
configuration error, never silently ignored.
"""

from __future__ import annotations

import os
from collections.abc import Iterable

from edge.errors import ConfigInvalidError

ENGINE = "engine"
OTHERS = ("grabber", "publisher", "supervisor")


def parse_cpu_list(text: str) -> tuple[int, ...]:
    """``"0,2-3"`` -> ``(0, 2, 3)``: sorted, without repeats.

    Raises:
        ValueError: not a list of core numbers and ranges, or a range that runs backwards.
    """
    cores: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        first, dash, last = part.partition("-")
        if not first.isdigit() or (dash and not last.isdigit()):
            raise ValueError(f"{text!r} is not a core list such as 1 or 0,2-3")
        low, high = int(first), int(last) if dash else int(first)
        if high < low:
            raise ValueError(f"{text!r}: the range {part} runs backwards")
        cores.update(range(low, high + 1))
    return tuple(sorted(cores))


def usable_cpus() -> set[int]:
    """The cores this process may run on now (its affinity mask: systemd's ``CPUAffinity=``,
    ``taskset`` or a container's cpuset)."""
    if not hasattr(os, "sched_getaffinity"):
        return set(range(os.cpu_count() or 1))
    return set(os.sched_getaffinity(0))


def plan_cpus(engine_cpus: Iterable[int] | None) -> dict[str, tuple[int, ...]] | None:
    """The cores of each process when the engine gets ``engine_cpus``; None: no pinning.

    Returns:
        ``{"engine": ..., "grabber": ..., "publisher": ..., "supervisor": ...}``, the last
        three all the usable cores outside ``engine_cpus``.

    Raises:
        ConfigInvalidError: a core this process may not use, no core left for the others, or
            no affinity on this operating system.
    """
    if engine_cpus is None:
        return None
    engine = tuple(sorted(set(engine_cpus)))
    if not hasattr(os, "sched_setaffinity"):
        raise ConfigInvalidError("engine_cpus: CPU pinning needs Linux (os.sched_setaffinity)")
    usable = usable_cpus()
    outside = sorted(set(engine) - usable)
    if not engine or outside:
        raise ConfigInvalidError(
            f"engine_cpus {_cpu_list(engine)}: core(s) {_cpu_list(outside)} not usable here "
            f"(usable: {_cpu_list(sorted(usable))})"
        )
    rest = tuple(sorted(usable - set(engine)))
    if not rest:
        raise ConfigInvalidError(
            f"engine_cpus {_cpu_list(engine)} takes every usable core: none is left for the "
            "grabber and publisher"
        )
    return {ENGINE: engine, **{name: rest for name in OTHERS}}


def pin(cores: Iterable[int] | None) -> None:
    """Run every thread of the calling process on ``cores`` from now on (None: leave it as it
    is). Linux keeps an affinity mask per thread, and ``sched_setaffinity(0)`` sets only the
    caller's: threads started before (a progress bar's monitor, zmq's I/O threads) are set one
    by one from ``/proc/self/task``; threads started after inherit the mask."""
    if cores is None:
        return
    cores = set(cores)
    os.sched_setaffinity(0, cores)
    try:
        threads = [int(tid) for tid in os.listdir("/proc/self/task")]
    except OSError:
        return
    for tid in threads:
        try:
            os.sched_setaffinity(tid, cores)
        except OSError:
            continue  # the thread ended meanwhile


def _cpu_list(cores: Iterable[int]) -> str:
    return ",".join(str(core) for core in cores) or "none"
