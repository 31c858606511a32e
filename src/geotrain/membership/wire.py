"""The coordinator's wire: framed JSON over TCP, joined by challenge-response on a shared secret.

Nothing here imports torch. Both ends hold the run's secret (a token file). A connection opens with a
handshake in which each side proves it holds the secret without sending it::

    client -> server   {"hello": "geotrain", "version": 1, "nonce": Nc}
    server -> client   {"nonce": Ns, "proof": HMAC(secret, "server" | Nc | Ns)}
    client -> server   {"proof": HMAC(secret, "client" | Nc | Ns)}
    server -> client   {"ok": true}            (or {"ok": false, "error": ...} and the connection closes)

The server proves itself first, so a site that holds another run's token learns it before it says anything
more, and a coordinator refuses a site whose proof does not match. Both nonces are fresh random 32 bytes,
so a recorded handshake cannot be replayed. Every later frame carries an HMAC-SHA256 of its body under a
session key derived from the secret and both nonces, with a per-direction sequence number: a frame that was
altered, replayed, reordered or injected by someone without the secret ends the connection.

The secret authenticates membership and the control plane. It does not encrypt anything: gloo's payload
traffic between sites is plain TCP in this build, so cross-site links belong on a private network or VPN.

Frame: 4-byte big-endian length, then (after the handshake) 32 bytes of MAC and the UTF-8 JSON body.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import secrets
import socket
import stat
import struct
from pathlib import Path
from typing import Any

from geotrain.errors import ConfigError

__all__ = [
    "AuthError",
    "Channel",
    "MAX_FRAME",
    "PROTOCOL_VERSION",
    "WireError",
    "client_handshake",
    "create_token_file",
    "encode_body",
    "read_token_file",
    "server_proof",
]

PROTOCOL_VERSION = 1
MAX_FRAME = 64 << 20
"""Largest frame after the handshake (a store value, a sum, the events of a long run)."""
MAX_HANDSHAKE_FRAME = 4096
"""Largest frame before the peer has proven it holds the secret."""
TOKEN_BYTES = 32
MIN_TOKEN_BYTES = 16
_LEN = struct.Struct(">I")
_MAC = 32


class WireError(ConnectionError):
    """The connection broke, or a frame was malformed or failed its MAC: the connection is unusable."""


class AuthError(ConfigError):
    """The other side does not hold the same secret (or is not a geotrain coordinator)."""


# -- the token file --------------------------------------------------------------------------------------------

def create_token_file(path: Path) -> bytes:
    """Write a fresh random secret to ``path`` (hex, mode 0600, created exclusively) and return it."""
    secret = secrets.token_bytes(TOKEN_BYTES)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secret.hex() + "\n")
        f.flush()
        os.fsync(f.fileno())
    return secret


def read_token_file(path: Path, *, field: str = "--token-file") -> bytes:
    """The secret in ``path``: hex (at least 16 bytes) on the first line. ConfigError naming the fix otherwise."""
    try:
        info = path.stat()
        text = path.read_text(encoding="ascii").strip()
    except FileNotFoundError:
        raise ConfigError(f"{str(path)!r} does not exist; create one with 'geotrain coordinator --token-file "
                          f"{path}' (it writes a fresh secret) and copy it to every site", field=field) from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"cannot read {str(path)!r} ({getattr(e, 'strerror', None) or e})", field=field) from None
    if info.st_mode & (stat.S_IRWXG | stat.S_IRWXO):
        # A secret others can read authenticates nobody; say so rather than silently accept it.
        raise ConfigError(f"{str(path)!r} can be read by other users (mode {stat.S_IMODE(info.st_mode):o}); "
                          f"run 'chmod 600 {path}'", field=field)
    try:
        secret = bytes.fromhex(text.splitlines()[0] if text else "")
    except ValueError:
        secret = b""
    if len(secret) < MIN_TOKEN_BYTES:
        raise ConfigError(f"{str(path)!r} must hold a secret of at least {MIN_TOKEN_BYTES} bytes in hex on its "
                          "first line (geotrain coordinator writes one)", field=field)
    return secret


# -- the handshake ---------------------------------------------------------------------------------------------

def _mac(key: bytes, *parts: bytes) -> bytes:
    return hmac.new(key, b"|".join(parts), hashlib.sha256).digest()


def server_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return _mac(secret, b"server", client_nonce, server_nonce)


def client_proof(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return _mac(secret, b"client", client_nonce, server_nonce)


def session_key(secret: bytes, client_nonce: bytes, server_nonce: bytes) -> bytes:
    return _mac(secret, b"session", client_nonce, server_nonce)


def encode_body(obj: Any) -> bytes:
    """The body of a frame: compact UTF-8 JSON."""
    return json.dumps(obj, separators=(",", ":")).encode()


def _plain_frame(obj: dict[str, Any]) -> bytes:
    body = json.dumps(obj, separators=(",", ":")).encode()
    return _LEN.pack(len(body)) + body


def _read_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise WireError("connection closed by the coordinator")
        buf += chunk
    return bytes(buf)


def _read_plain(sock: socket.socket) -> dict[str, Any]:
    (n,) = _LEN.unpack(_read_exact(sock, 4))
    if n > MAX_HANDSHAKE_FRAME:
        raise WireError(f"handshake frame of {n} bytes; the other side is not a geotrain coordinator")
    try:
        obj = json.loads(_read_exact(sock, n))
    except ValueError:
        raise WireError("malformed handshake frame; the other side is not a geotrain coordinator") from None
    if not isinstance(obj, dict):
        raise WireError("malformed handshake frame; the other side is not a geotrain coordinator")
    return obj


def client_handshake(sock: socket.socket, secret: bytes, *, address: str) -> Channel:
    """Prove this side holds ``secret`` and check that the coordinator does too; returns the open channel.

    Raises AuthError (bad input: another run's token) or WireError (the connection broke)."""
    nonce = secrets.token_bytes(32)
    sock.sendall(_plain_frame({"hello": "geotrain", "version": PROTOCOL_VERSION, "nonce": nonce.hex()}))
    reply = _read_plain(sock)
    if "error" in reply:
        raise AuthError(f"the coordinator at {address} refused the connection: {reply['error']}", field="coordinator")
    try:
        server_nonce = bytes.fromhex(reply["nonce"])
        proof = bytes.fromhex(reply["proof"])
    except (KeyError, TypeError, ValueError):
        raise WireError(f"{address} is not a geotrain coordinator (unexpected handshake)") from None
    if not hmac.compare_digest(proof, server_proof(secret, nonce, server_nonce)):
        raise AuthError(f"the coordinator at {address} does not hold this site's secret: give the sites and the "
                        "coordinator the same --token-file", field="coordinator")
    sock.sendall(_plain_frame({"proof": client_proof(secret, nonce, server_nonce).hex()}))
    verdict = _read_plain(sock)
    if not verdict.get("ok"):
        raise AuthError(f"the coordinator at {address} refused this site: {verdict.get('error', 'no reason given')}",
                        field="coordinator")
    return Channel(sock, session_key(secret, nonce, server_nonce), is_client=True)


class Channel:
    """An authenticated connection: ``send`` and ``recv`` JSON objects, each MACed and sequence-numbered.

    One thread sends and one receives at a time (callers hold a lock where threads share a channel)."""

    def __init__(self, sock: socket.socket, key: bytes, *, is_client: bool) -> None:
        self.sock = sock
        self._key = key
        self._out = b"c" if is_client else b"s"
        self._in = b"s" if is_client else b"c"
        self._sent = 0
        self._received = 0

    def seal(self, obj: Any) -> bytes:
        """One outgoing frame (advances the send sequence)."""
        return self.seal_body(encode_body(obj))

    def seal_body(self, body: bytes) -> bytes:
        """One outgoing frame around a body already encoded by ``encode_body`` (advances the send sequence):
        a reply that many peers receive is encoded once, and only its MAC is computed per peer."""
        mac = _mac(self._key, self._out, self._sent.to_bytes(8, "big"), body)
        self._sent += 1
        return _LEN.pack(_MAC + len(body)) + mac + body

    def open(self, frame: bytes) -> Any:
        """The object in one incoming frame (without its length prefix); WireError if its MAC fails."""
        if len(frame) < _MAC:
            raise WireError("frame shorter than its MAC")
        mac, body = frame[:_MAC], frame[_MAC:]
        want = _mac(self._key, self._in, self._received.to_bytes(8, "big"), body)
        if not hmac.compare_digest(mac, want):
            raise WireError("a frame failed its MAC (altered, replayed or injected): connection closed")
        self._received += 1
        try:
            return json.loads(body)
        except ValueError:
            raise WireError("malformed frame body") from None

    def send(self, obj: Any) -> None:
        try:
            self.sock.sendall(self.seal(obj))
        except OSError as e:
            raise WireError(f"connection to the coordinator lost ({e.strerror or e})") from None

    def recv(self) -> Any:
        try:
            (n,) = _LEN.unpack(_read_exact(self.sock, 4))
            if n > MAX_FRAME + _MAC:
                raise WireError(f"frame of {n} bytes exceeds {MAX_FRAME}")
            return self.open(_read_exact(self.sock, n))
        except OSError as e:
            if isinstance(e, WireError):
                raise
            raise WireError(f"connection to the coordinator lost ({e.strerror or e})") from None

    def close(self) -> None:
        try:
            self.sock.close()
        except OSError:
            pass
