"""The durable alarm spool: every sequenced message is committed to SQLite before it is sent.

One SQLite file per vehicle (the publisher's ``spool_path``), in WAL mode. Two tables:

- ``sequences(vehicle_id, run_id, topic, last_seq)``: the last number allocated per stream. Kept
  apart from the messages so numbers never go back, even after old messages are deleted.
- ``messages(vehicle_id, run_id, topic, seq, body, heatmap_png, spooled_time, sent_time)``: the
  JSON exactly as published, the optional PNG, and when it was first handed to the PUB socket
  (NULL: not yet).

Guarantees and their limits:

1. :meth:`Spool.append` allocates the next number and inserts the message in one
   ``BEGIN IMMEDIATE`` transaction; when it returns, the message is committed. A process killed
   at any moment leaves either the whole transaction or none of it (WAL atomic commit), and a
   number is never handed out twice: ``last_seq`` is read and written under the write lock.
2. ``synchronous=FULL`` (the default) fsyncs the WAL at every commit, so a returned append also
   survives a power cut of the vehicle computer, not just a killed process. It costs one fsync
   per alarm (about 0.3 ms on an SSD, a few ms on eMMC); alarms are a few per kilometre, so that
   is cheap insurance. ``NORMAL`` would skip it and could lose the last commits on power loss.
3. Sent marks are advisory. The sender's connection may use ``synchronous=NORMAL`` (the
   publisher does): a mark lost in a power cut only makes the message go out again after the
   restart, and subscribers drop the duplicate by (vehicle, run, seq).
4. Not guaranteed: survival of the storage itself (a dead SD card), and room on it. Nothing is
   pruned yet; :meth:`delete_run` is there for a retention job to call.

A :class:`Spool` holds one SQLite connection. It may move between threads but must not be used
by two at once (the publisher serialises its use). Several connections (threads or processes)
may share the file; writers wait up to ``busy_timeout_s``.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from edge.errors import ConfigInvalidError, EdgeError, ExitStatus
from edge.logs import get_logger
from edge.publisher.schema import ALARM_TOPIC, SEQUENCED_TOPICS, RunInfo

log = get_logger(__name__)

SPOOL_FORMAT = "1"

_SCHEMA = (
    """CREATE TABLE IF NOT EXISTS meta (
        key TEXT PRIMARY KEY,
        value TEXT NOT NULL
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS sequences (
        vehicle_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        last_seq INTEGER NOT NULL,
        PRIMARY KEY (vehicle_id, run_id, topic)
    ) WITHOUT ROWID""",
    """CREATE TABLE IF NOT EXISTS messages (
        vehicle_id TEXT NOT NULL,
        run_id TEXT NOT NULL,
        topic TEXT NOT NULL,
        seq INTEGER NOT NULL,
        body BLOB NOT NULL,
        heatmap_png BLOB,
        spooled_time REAL NOT NULL,
        sent_time REAL,
        PRIMARY KEY (vehicle_id, run_id, topic, seq)
    )""",
    """CREATE INDEX IF NOT EXISTS messages_unsent
        ON messages (vehicle_id, run_id, topic, seq) WHERE sent_time IS NULL""",
)

_COLUMNS = "topic, vehicle_id, run_id, seq, body, heatmap_png, spooled_time, sent_time"


class SpoolError(EdgeError):
    """The spool file cannot be opened or written (corrupt, read-only, disk full)."""

    exit_status = ExitStatus.SERVICE_FAILED


@dataclass(frozen=True)
class SpooledMessage:
    """One message as stored: ``body`` is the JSON frame exactly as it goes on the wire."""

    topic: str
    vehicle_id: str
    run_id: str
    seq: int
    body: bytes
    heatmap_png: bytes | None
    spooled_time: float
    sent_time: float | None

    @property
    def key(self) -> tuple[str, str, str, int]:
        return (self.topic, self.vehicle_id, self.run_id, self.seq)

    @property
    def size(self) -> int:
        return len(self.body) + len(self.heatmap_png or b"")


@dataclass(frozen=True)
class StreamInfo:
    """One (vehicle, run, topic) stream held in the spool."""

    vehicle_id: str
    run_id: str
    topic: str
    last_seq: int


class Spool:
    """A connection to the spool file (created on first use).

    Args:
        path: the SQLite file; its folder is created.
        synchronous: ``"FULL"`` (fsync at every commit: survives power loss) or ``"NORMAL"``
            (survives a killed process only). See the module docstring.
        busy_timeout_s: how long a write waits for another connection's write lock.
    """

    def __init__(
        self,
        path: str | Path,
        *,
        synchronous: Literal["FULL", "NORMAL"] = "FULL",
        busy_timeout_s: float = 10.0,
    ) -> None:
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous {synchronous!r}: use FULL or NORMAL")
        self.path = Path(path)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = sqlite3.connect(
                str(self.path),
                timeout=busy_timeout_s,
                isolation_level=None,
                check_same_thread=False,
            )
        except (OSError, sqlite3.Error) as error:
            raise SpoolError(f"{self.path}: cannot open the spool ({error})") from error
        try:
            mode = self._db.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolError(f"{self.path}: WAL mode refused (journal_mode={mode})")
            self._db.execute(f"PRAGMA synchronous={synchronous}")
            with self._write():
                for statement in _SCHEMA:
                    self._db.execute(statement)
                self._db.execute(
                    "INSERT OR IGNORE INTO meta (key, value) VALUES ('format', ?)", (SPOOL_FORMAT,)
                )
                found = self._db.execute("SELECT value FROM meta WHERE key = 'format'").fetchone()
            if found[0] != SPOOL_FORMAT:
                raise SpoolError(f"{self.path}: spool format {found[0]}, expected {SPOOL_FORMAT}")
        except sqlite3.Error as error:
            self._db.close()
            raise SpoolError(f"{self.path}: not a usable spool ({error})") from error
        except BaseException:
            self._db.close()
            raise

    # Writing.

    def append(
        self,
        topic: str,
        run: RunInfo,
        make_body: Callable[[int, float], bytes],
        heatmap_png: bytes | None = None,
    ) -> SpooledMessage:
        """Allocate the next sequence number of ``(run, topic)`` and commit one message.

        ``make_body(seq, spooled_time)`` returns the JSON frame; it runs inside the transaction,
        so the number is in the body and nothing is stored (and no number used) if it raises.
        When this returns, the message is committed (and fsynced under ``synchronous=FULL``).
        """
        return self.append_many(topic, run, [(make_body, heatmap_png)])[0]

    def append_many(
        self,
        topic: str,
        run: RunInfo,
        items: Sequence[tuple[Callable[[int, float], bytes], bytes | None]],
    ) -> list[SpooledMessage]:
        """:meth:`append` for several messages in one transaction (one fsync): consecutive
        numbers, all committed or none (if any ``make_body`` raises)."""
        if topic not in SEQUENCED_TOPICS:
            raise ValueError(f"topic {topic!r} is not spooled; use one of {SEQUENCED_TOPICS}")
        if not items:
            return []
        stored: list[SpooledMessage] = []
        with self._write():
            row = self._db.execute(
                "SELECT last_seq FROM sequences WHERE vehicle_id = ? AND run_id = ? AND topic = ?",
                (run.vehicle_id, run.run_id, topic),
            ).fetchone()
            last_seq = row[0] if row else 0
            spooled_time = time.time()
            for make_body, heatmap_png in items:
                last_seq += 1
                body = make_body(last_seq, spooled_time)
                self._db.execute(
                    "INSERT INTO messages (vehicle_id, run_id, topic, seq, body, heatmap_png,"
                    " spooled_time) VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (run.vehicle_id, run.run_id, topic, last_seq, body, heatmap_png, spooled_time),
                )
                key = (topic, run.vehicle_id, run.run_id, last_seq)
                stored.append(SpooledMessage(*key, body, heatmap_png, spooled_time, None))
            self._db.execute(
                "INSERT INTO sequences (vehicle_id, run_id, topic, last_seq) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (vehicle_id, run_id, topic)"
                " DO UPDATE SET last_seq = excluded.last_seq",
                (run.vehicle_id, run.run_id, topic, last_seq),
            )
        return stored

    def mark_sent(
        self, keys: Iterable[tuple[str, str, str, int]], sent_time: float | None = None
    ) -> int:
        """Record that messages ``(topic, vehicle_id, run_id, seq)`` were handed to the PUB
        socket (first time only). Returns how many marks changed."""
        sent_time = time.time() if sent_time is None else sent_time
        rows = [(sent_time, vehicle, run, topic, seq) for topic, vehicle, run, seq in keys]
        if not rows:
            return 0
        with self._write():
            cursor = self._db.executemany(
                "UPDATE messages SET sent_time = ? WHERE vehicle_id = ? AND run_id = ?"
                " AND topic = ? AND seq = ? AND sent_time IS NULL",
                rows,
            )
            return cursor.rowcount

    def delete_run(self, vehicle_id: str, run_id: str) -> int:
        """Delete the messages of one run (a retention job's tool). Sequence numbers are kept,
        so a run that goes on numbers from where it was. Returns the messages deleted."""
        with self._write():
            cursor = self._db.execute(
                "DELETE FROM messages WHERE vehicle_id = ? AND run_id = ?", (vehicle_id, run_id)
            )
            return cursor.rowcount

    # Reading.

    def read_from(
        self,
        topic: str,
        vehicle_id: str,
        run_id: str,
        from_seq: int,
        *,
        limit: int = 256,
        max_bytes: int | None = None,
    ) -> list[SpooledMessage]:
        """Messages of one stream with ``seq >= from_seq`` in sequence order: at most ``limit``
        of them, and stopping before ``max_bytes`` of JSON+PNG would be passed (one message is
        always returned if there is one, however big)."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE vehicle_id = ? AND run_id = ? AND topic = ?"
            " AND seq >= ? ORDER BY seq LIMIT ?",
            (vehicle_id, run_id, topic, max(1, int(from_seq)), max(1, int(limit))),
        )
        return _take(rows, max_bytes)

    def alarms_from(
        self, run: RunInfo, from_seq: int, *, limit: int = 256, max_bytes: int | None = None
    ) -> list[SpooledMessage]:
        """The alarms of ``run`` from ``from_seq`` on (see :meth:`read_from`)."""
        return self.read_from(
            ALARM_TOPIC, run.vehicle_id, run.run_id, from_seq, limit=limit, max_bytes=max_bytes
        )

    def unsent(self, *, limit: int = 256, max_bytes: int | None = None) -> list[SpooledMessage]:
        """Messages of any run not yet handed to the PUB socket, in sequence order per stream
        (streams in key order)."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM messages WHERE sent_time IS NULL"
            " ORDER BY vehicle_id, run_id, topic, seq LIMIT ?",
            (max(1, int(limit)),),
        )
        return _take(rows, max_bytes)

    def count_unsent(self) -> int:
        """How many messages of any run are not yet handed to the PUB socket."""
        row = self._db.execute("SELECT COUNT(*) FROM messages WHERE sent_time IS NULL").fetchone()
        return int(row[0])

    def last_seq(self, topic: str, vehicle_id: str, run_id: str) -> int:
        """The last number allocated to a stream; 0 when it has none."""
        row = self._db.execute(
            "SELECT last_seq FROM sequences WHERE vehicle_id = ? AND run_id = ? AND topic = ?",
            (vehicle_id, run_id, topic),
        ).fetchone()
        return int(row[0]) if row else 0

    def streams(self) -> list[StreamInfo]:
        """Every stream that ever had a number allocated."""
        rows = self._db.execute(
            "SELECT vehicle_id, run_id, topic, last_seq FROM sequences"
            " ORDER BY vehicle_id, run_id, topic"
        )
        return [StreamInfo(*row) for row in rows]

    # Plumbing.

    def close(self) -> None:
        self._db.close()

    def __enter__(self) -> Spool:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    @contextmanager
    def _write(self) -> Iterator[None]:
        """One write transaction that takes the write lock first (no lock upgrade deadlock)."""
        try:
            self._db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as error:
            raise SpoolError(f"{self.path}: cannot start a write ({error})") from error
        try:
            yield
            self._db.execute("COMMIT")
        except sqlite3.Error as error:
            self._rollback()
            raise SpoolError(f"{self.path}: write failed ({error})") from error
        except BaseException:
            self._rollback()
            raise

    def _rollback(self) -> None:
        if self._db.in_transaction:
            self._db.execute("ROLLBACK")


def _take(rows: sqlite3.Cursor, max_bytes: int | None) -> list[SpooledMessage]:
    """Rows as messages until ``max_bytes``; the cursor is closed so no read stays open."""
    taken: list[SpooledMessage] = []
    total = 0
    try:
        for row in rows:
            message = SpooledMessage(*row)
            if taken and max_bytes is not None and total + message.size > max_bytes:
                break
            taken.append(message)
            total += message.size
    finally:
        rows.close()
    return taken


def check_spool(path: str | Path, named_by: str) -> None:
    """Open the spool at ``path`` once before any process starts, so that a path that cannot be
    a spool (a folder, a file of other bytes, a place that cannot be written) stops the command
    with :class:`ConfigInvalidError` (status 8) naming it and ``named_by`` (the option or config
    key), not with a publisher that fails until the restart limit (status 11, the status of a
    spool that fails while the pipeline runs)."""
    try:
        Spool(path).close()
    except SpoolError as error:
        raise ConfigInvalidError(f"{error} ({named_by})") from error
