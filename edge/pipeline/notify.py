"""systemd notifications without libsystemd: one datagram per message on ``$NOTIFY_SOCKET``.

The protocol (sd_notify(3)): newline-separated ``KEY=VALUE`` assignments sent as one datagram
to the AF_UNIX socket named by ``$NOTIFY_SOCKET``; a name starting with ``@`` is in the
abstract namespace (the ``@`` stands for a leading NUL byte). The supervisor, the service's
main process, is the only sender: with ``Type=notify`` systemd accepts messages from the main
PID only (``NotifyAccess=main``), so children never notify.

- ``READY=1`` once the engine passed its self-test inference and every child is up;
- ``WATCHDOG=1`` every half of ``$WATCHDOG_USEC``, and only while every child is healthy, so a
  stuck child makes systemd's watchdog fire even if the supervisor itself is fine;
- ``STOPPING=1`` on SIGTERM, before the drain; ``STATUS=`` lines for ``systemctl status``.

Without ``$NOTIFY_SOCKET`` (a terminal, a test) every call does nothing.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Mapping

from edge.logs import get_logger

log = get_logger(__name__)


class SystemdNotifier:
    """Sends notifications to systemd, if it is listening.

    Args:
        environ: where ``NOTIFY_SOCKET``, ``WATCHDOG_USEC`` and ``WATCHDOG_PID`` are read.
    """

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        environ = os.environ if environ is None else environ
        path = environ.get("NOTIFY_SOCKET", "")
        self.address: str | bytes | None = None
        if path.startswith("@"):
            self.address = b"\0" + path[1:].encode()
        elif path.startswith("/"):
            self.address = path
        self._socket: socket.socket | None = None
        if self.address is not None:
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.watchdog_interval_s = _watchdog_interval(environ)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    def notify(self, *assignments: str) -> bool:
        """Send ``KEY=VALUE`` lines as one datagram; False (logged) if it could not be sent."""
        if self._socket is None:
            return False
        try:
            self._socket.sendto("\n".join(assignments).encode(), self.address)
        except OSError as error:
            log.warning("notify_failed", error=str(error), message=assignments[0][:40])
            return False
        return True

    def ready(self, status: str = "") -> bool:
        return self.notify("READY=1", *([f"STATUS={status}"] if status else []))

    def watchdog(self) -> bool:
        return self.notify("WATCHDOG=1")

    def stopping(self, status: str = "") -> bool:
        return self.notify("STOPPING=1", *([f"STATUS={status}"] if status else []))

    def status(self, text: str) -> bool:
        return self.notify(f"STATUS={text}")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Half of ``$WATCHDOG_USEC`` in seconds, if the watchdog is meant for this process."""
    usec = environ.get("WATCHDOG_USEC", "")
    pid = environ.get("WATCHDOG_PID", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    if pid and pid != str(os.getpid()):
        return None
    return int(usec) / 2e6
