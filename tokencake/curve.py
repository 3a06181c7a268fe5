"""ZMQ CURVE, what both ends share: key files that must be private, and the client's keys.

The daemon's side (its key pair, the allowlist of client keys) is ``tokencake.daemon.auth``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import zmq
import zmq.auth


class AuthError(RuntimeError):
    pass


def check_private(path: Path) -> None:
    """Refuse a key file that is not ours, or that others may read."""
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise AuthError(f"{path} is owned by uid {st.st_uid}, not by us")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise AuthError(f"{path} is readable by others; chmod 600 it")


def configure_curve_client(
    sock: zmq.Socket[Any], server_public_key: bytes, client_secret_file: Path | None = None
) -> None:
    if client_secret_file is not None:
        check_private(client_secret_file)
        public, secret = zmq.auth.load_certificate(client_secret_file)
        if secret is None:
            raise AuthError(f"{client_secret_file} has no secret key")
    else:
        public, secret = zmq.curve_keypair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public_key
