"""What every child process shares: its entry point and its control link to the supervisor.

A child is started by the supervisor with the ``spawn`` method and runs :func:`main`, which

1. ignores SIGINT and SIGTERM (Ctrl-C in a terminal, ``timeout(1)`` or a
   ``KillMode=control-group`` stop reach the whole process group; the supervisor decides how
   its children stop: by a ``stop`` command, or SIGKILL at its stop timeout) and configures
   structlog JSON lines with the child's name bound;
2. creates its own zmq Context (a Context never crosses a process boundary) and connects a
   DEALER to the supervisor's ``ctl`` ROUTER, identity = the child's name;
3. runs the process module's ``run(settings, link)``;
4. reports a failure the user must fix (an :class:`~edge.errors.EdgeError` other than
   SERVICE_FAILED) as ``fatal`` with its exit status and message, and exits with that status:
   restarting cannot mend a corrupt model file. Any other exception is logged and the child
   exits 1; the supervisor restarts it.

Every message a child sends carries its ``name``, ``generation`` (restart count) and ``pid``,
so the supervisor ignores late messages of a child it already replaced.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time

import zmq

from edge.errors import EdgeError, ExitStatus
from edge.logs import configure, get_logger
from edge.pipeline import wire
from edge.pipeline.cpus import pin, usable_cpus

log = get_logger(__name__)

PROCESS_MODULES = {
    "grabber": ("edge.pipeline.grabber_process", "GrabberSettings"),
    "engine": ("edge.pipeline.engine_process", "EngineSettings"),
    "publisher": ("edge.pipeline.publisher_process", "PublisherSettings"),
}


class ParentGone(RuntimeError):
    """The supervisor died (its children are re-parented); the child stops."""


class ControlLink:
    """The child's DEALER to the supervisor, with heartbeats on a monotonic clock.

    Args:
        context: the child's zmq Context.
        folder: the run folder holding the ``ctl`` socket.
        name: ``grabber``, ``engine`` or ``publisher``.
        generation: how many times this child was restarted before.
        heartbeat_interval_s: :meth:`beat` sends at most this often.
    """

    def __init__(
        self,
        context: zmq.Context,
        folder: str,
        name: str,
        generation: int,
        heartbeat_interval_s: float,
    ) -> None:
        self.name = name
        self.generation = generation
        self.heartbeat_interval_s = heartbeat_interval_s
        self.socket = context.socket(zmq.DEALER)
        self.socket.setsockopt(zmq.IDENTITY, name.encode())
        self.socket.connect(wire.endpoint(folder, wire.CTL))
        self._parent = os.getppid()
        self._next_beat = 0.0

    def send(self, kind: str, **fields) -> None:
        """One event to the supervisor (never blocks: the ctl pipe's HWM is far off)."""
        message = {"type": kind, "name": self.name, "generation": self.generation}
        message["pid"] = os.getpid()
        message.update(fields)
        wire.send_json(self.socket, message)

    def beat(self, force: bool = False, **stats) -> None:
        """A heartbeat with ``stats`` if one is due; raises :class:`ParentGone` if orphaned."""
        now = time.monotonic()
        if not force and now < self._next_beat:
            return
        if os.getppid() != self._parent:
            raise ParentGone(f"supervisor {self._parent} is gone")
        self.send("heartbeat", **stats)
        self._next_beat = now + self.heartbeat_interval_s

    def commands(self) -> list[dict]:
        """Every command waiting, without blocking."""
        out = []
        while True:
            try:
                out.append(wire.recv_json(self.socket, zmq.NOBLOCK))
            except zmq.Again:
                return out


def main(kind: str, settings_json: str, folder: str, generation: int, log_level: str) -> None:
    """Entry point of a child process (steps in the module docstring)."""
    # 1. Signals and logs.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure(kind, log_level)
    # 2. Context and link.
    module_name, settings_name = PROCESS_MODULES[kind]
    module = importlib.import_module(module_name)
    settings_class = getattr(importlib.import_module("edge.pipeline.settings"), settings_name)
    settings = settings_class.model_validate_json(settings_json)
    pin(settings.cpus)  # before the backend starts its threads: they inherit the cores
    context = zmq.Context()
    link = ControlLink(context, folder, kind, generation, settings.heartbeat_interval_s)
    log.info("child_started", generation=generation, ppid=os.getppid(), cpus=sorted(usable_cpus()))
    status = 0
    # 3. Run; 4. report.
    try:
        module.run(settings, link, context, folder)
    except ParentGone as error:
        log.error("child_orphaned", reason=str(error))
        status = int(ExitStatus.SERVICE_FAILED)
    except EdgeError as error:
        status = int(error.exit_status)
        if error.exit_status != ExitStatus.SERVICE_FAILED:
            log.error("child_fatal", status=status, message=str(error))
            link.send("fatal", status=status, message=str(error))
        else:
            log.error("child_failed", status=status, message=str(error))
    except Exception:
        log.exception("child_crashed")
        status = 1
    finally:
        link.socket.close(linger=2000)  # a last `fatal` or `stopped` must get out
        context.destroy(linger=0)  # data sockets: what is queued is resent after acks
    log.info("child_exit", status=status, cpu_s=round(time.process_time(), 3))
    sys.exit(status)
