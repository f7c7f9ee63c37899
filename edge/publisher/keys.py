"""CURVE keys of the publisher and its subscribers (ZeroMQ CurveZMQ, zmq.auth certificates).

The publisher's keys folder (``PublisherConfig.keys_dir``)::

    keys_dir/
      server.key          the publisher's public certificate: give it to subscribers
      server.key_secret   the publisher's key pair: stays on the vehicle (mode 0600)
      clients/            one public certificate (*.key) per allowed subscriber

A subscriber holds ``server.key`` and its own ``NAME.key_secret``. Both the PUB and the replay
ROUTER check every client key against ``clients/`` (ZAP, through a ThreadAuthenticator) and
encrypt all traffic. The folder is read when the publisher starts: a key added later takes
effect at the next start.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import zmq
import zmq.auth

from edge.errors import ConfigInvalidError

SERVER_NAME = "server"
CLIENTS_DIR = "clients"


def require_curve() -> None:
    """ConfigInvalidError unless this libzmq was built with CURVE (libsodium)."""
    if not zmq.has("curve"):
        raise ConfigInvalidError(
            f"keys are configured but libzmq {zmq.zmq_version()} has no CURVE support"
        )


def create_server_keys(keys_dir: str | Path) -> Path:
    """Make ``server.key``, ``server.key_secret`` and an empty ``clients/`` in ``keys_dir``.
    Returns the public certificate's path (the file subscribers need)."""
    keys_dir = Path(keys_dir)
    (keys_dir / CLIENTS_DIR).mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(keys_dir, SERVER_NAME)
    Path(secret_file).chmod(0o600)
    return Path(public_file)


def create_client_keys(folder: str | Path, name: str) -> tuple[Path, Path]:
    """Make ``NAME.key`` and ``NAME.key_secret`` for one subscriber in ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    public_file, secret_file = zmq.auth.create_certificates(folder, name)
    Path(secret_file).chmod(0o600)
    return Path(public_file), Path(secret_file)


def allow_client(keys_dir: str | Path, public_key_file: str | Path) -> Path:
    """Copy a subscriber's public certificate into ``keys_dir/clients/``."""
    clients = Path(keys_dir) / CLIENTS_DIR
    clients.mkdir(parents=True, exist_ok=True)
    return Path(shutil.copy(public_key_file, clients / Path(public_key_file).name))


def load_server_keys(keys_dir: str | Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` of the publisher; ConfigInvalidError naming the missing file."""
    keys_dir = Path(keys_dir)
    clients = keys_dir / CLIENTS_DIR
    if not clients.is_dir():
        raise ConfigInvalidError(f"{clients}: no folder of allowed client keys")
    return _load_pair(keys_dir / f"{SERVER_NAME}.key_secret")


def load_client_keys(secret_file: str | Path) -> tuple[bytes, bytes]:
    """``(public, secret)`` of a subscriber from its ``NAME.key_secret``."""
    return _load_pair(Path(secret_file))


def load_public_key(public_file: str | Path) -> bytes:
    """The public key in a certificate (``server.key`` for a subscriber)."""
    path = Path(public_file)
    try:
        public, _ = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise ConfigInvalidError(f"{path}: not a readable CURVE certificate ({error})") from error
    return public


def _load_pair(path: Path) -> tuple[bytes, bytes]:
    try:
        public, secret = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as error:
        raise ConfigInvalidError(f"{path}: not a readable CURVE certificate ({error})") from error
    if not secret:
        raise ConfigInvalidError(f"{path}: holds no secret key")
    return public, secret
