"""ZMQ CURVE for TCP endpoints: the daemon never listens on TCP without authentication."""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import zmq
import zmq.auth


class AuthError(RuntimeError):
    pass


def _check_private(path: Path) -> None:
    st = path.stat()
    if st.st_uid != os.geteuid():
        raise AuthError(f"{path} is owned by uid {st.st_uid}, not by us")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise AuthError(f"{path} is readable by others; chmod 600 it")


def configure_curve_server(sock: zmq.Socket[Any], secret_key_file: Path) -> None:
    """Make ``sock`` a CURVE server with the key pair in ``secret_key_file``.

    Clients must know the server's public key; which clients may connect is decided by
    the key they present (ZAP is not used: possession of the server's public key plus a
    CURVE handshake is the authentication, as in zmq's ironhouse pattern without a list).
    """
    _check_private(secret_key_file)
    public, secret = zmq.auth.load_certificate(secret_key_file)
    if secret is None:
        raise AuthError(f"{secret_key_file} has no secret key")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def configure_curve_client(
    sock: zmq.Socket[Any], server_public_key: bytes, client_secret_file: Path | None = None
) -> None:
    if client_secret_file is not None:
        _check_private(client_secret_file)
        public, secret = zmq.auth.load_certificate(client_secret_file)
        if secret is None:
            raise AuthError(f"{client_secret_file} has no secret key")
    else:
        public, secret = zmq.curve_keypair()
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_serverkey = server_public_key
