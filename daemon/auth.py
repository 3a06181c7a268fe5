"""ZMQ CURVE for TCP endpoints: the daemon never listens on TCP without authentication.

The daemon's side; what clients share with it is ``tokencake.curve``.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path
from typing import Any

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator

from tokencake.curve import AuthError, check_private


def configure_curve_server(sock: zmq.Socket[Any], secret_key_file: Path) -> None:
    """Make ``sock`` a CURVE server with the key pair in ``secret_key_file``.

    Clients must know the server's public key; which clients may connect is decided by
    the ZAP handler of :func:`start_authenticator` (zmq's ironhouse pattern): start it on
    the socket's context before binding.
    """
    check_private(secret_key_file)
    public, secret = zmq.auth.load_certificate(secret_key_file)
    if secret is None:
        raise AuthError(f"{secret_key_file} has no secret key")
    sock.curve_secretkey = secret
    sock.curve_publickey = public
    sock.curve_server = True


def start_authenticator(ctx: zmq.Context[Any], authorized_keys_dir: Path) -> ThreadAuthenticator:
    """A ZAP handler on ``ctx`` that admits only CURVE clients whose public key is a
    certificate in ``authorized_keys_dir``; everyone else is refused at the handshake.

    The directory must be ours and not writable by others (whoever can add a file there can
    let themselves in), and must hold at least one key: an empty allowlist is refused rather
    than served, since it would be either useless or a sign of a mistake.
    """
    try:
        st = authorized_keys_dir.stat()
    except OSError as exc:
        raise AuthError(f"curve_authorized_keys_dir {authorized_keys_dir}: {exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise AuthError(f"curve_authorized_keys_dir {authorized_keys_dir} is not a directory")
    if st.st_uid != os.geteuid():
        raise AuthError(
            f"curve_authorized_keys_dir {authorized_keys_dir} is owned by uid {st.st_uid}, "
            "not by us"
        )
    if stat.S_IMODE(st.st_mode) & 0o022:
        raise AuthError(
            f"curve_authorized_keys_dir {authorized_keys_dir} is writable by others; chmod go-w it"
        )
    try:
        keys = zmq.auth.load_certificates(authorized_keys_dir)
    except (OSError, ValueError) as exc:
        raise AuthError(
            f"curve_authorized_keys_dir {authorized_keys_dir}: cannot read client keys: {exc}"
        ) from None
    if not keys:
        raise AuthError(
            f"curve_authorized_keys_dir {authorized_keys_dir} holds no client public keys: "
            "refusing TCP"
        )
    auth = ThreadAuthenticator(ctx)
    auth.start()
    auth.configure_curve(domain="*", location=str(authorized_keys_dir))
    return auth
