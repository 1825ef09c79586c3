"""DICOM TLS on the Storage SCP (PS3.15 B.1): the server context, and the handshake of a connection
handed to a receive worker."""

from __future__ import annotations

import socket
import ssl

import structlog

from dmg_node.config import Settings
from dmg_node.errors import ConfigError

log = structlog.get_logger(__name__)


def tls_context(settings: Settings) -> ssl.SSLContext | None:
    """The server-side TLS context from ``[tls]``, or None when TLS is off (PS3.15 B.1)."""
    tls = settings.tls
    if not tls.enabled:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        ctx.load_cert_chain(tls.cert, tls.key)
        if tls.ca:
            ctx.load_verify_locations(tls.ca)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"{settings.source}: [tls] certificate, key or CA cannot be loaded: {exc}") from exc
    ctx.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return ctx


def handshake(ctx: ssl.SSLContext, sock: socket.socket, timeout: float, peer: str) -> ssl.SSLSocket | None:
    """The server side of the TLS handshake on *sock*, bounded by *timeout*; None (logged) if it fails."""
    try:
        sock.settimeout(timeout)
        wrapped = ctx.wrap_socket(sock, server_side=True)
        wrapped.settimeout(None)
        return wrapped
    except (OSError, ValueError) as exc:
        log.warning("tls_handshake_failed", peer=peer, error=str(exc)[:200])
        return None
