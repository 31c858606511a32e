"""The coordinator's wire: the challenge-response handshake on the run's secret, MACed frames, token files.

Handshakes run against a real coordinator on loopback (its event loop on a thread of this process) or against
a scripted peer on a socket pair. Every byte a site sends or receives is recorded, so the tests can say that
the secret itself never travels, under the right secret or the wrong one.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import socket
import stat
import struct
import threading

import pytest

from _utils.membership import serving, wait_until
from geotrain.errors import ConfigError
from geotrain.membership import wire
from geotrain.membership.__main__ import main as coordinator_main
from geotrain.membership.wire import (
    MAX_FRAME,
    PROTOCOL_VERSION,
    AuthError,
    Channel,
    WireError,
    client_handshake,
    client_proof,
    create_token_file,
    read_token_file,
    server_proof,
    session_key,
)

pytestmark = pytest.mark.timeout(60)

SECRET = bytes(range(32))
OTHER = bytes(range(100, 132))


class Recording:
    """A site's socket that keeps every byte it sends and receives: the whole conversation on the wire."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.sent = bytearray()
        self.received = bytearray()

    def sendall(self, data: bytes) -> None:
        self.sent += data
        self.sock.sendall(data)

    def recv(self, n: int) -> bytes:
        data = self.sock.recv(n)
        self.received += data
        return data

    def settimeout(self, t: float | None) -> None:
        self.sock.settimeout(t)

    def close(self) -> None:
        self.sock.close()

    @property
    def transcript(self) -> bytes:
        return bytes(self.sent + self.received)


def _connect(port: int) -> Recording:
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    return Recording(sock)


def _leaks(transcript: bytes, secret: bytes) -> list[str]:
    """The forms in which ``secret`` (or any 8 bytes of it) appears in ``transcript``."""
    found = []
    hexed = secret.hex()
    for form, text in (("raw", secret), ("hex", hexed.encode()), ("HEX", hexed.upper().encode()),
                       ("base64", base64.b64encode(secret)), ("urlsafe base64", base64.urlsafe_b64encode(secret))):
        if text in transcript:
            found.append(form)
    for i in range(len(secret) - 8 + 1):
        if secret[i:i + 8] in transcript:
            found.append(f"raw bytes {i}..{i + 8}")
        if hexed[2 * i:2 * i + 16].encode() in transcript.lower():
            found.append(f"hex of bytes {i}..{i + 8}")
    return found


def _frames(data: bytes) -> list[bytes]:
    """The bodies of length-prefixed frames in ``data``."""
    out = []
    while data:
        (n,) = struct.unpack(">I", data[:4])
        out.append(data[4:4 + n])
        data = data[4 + n:]
    return out


def _plain(obj: dict) -> bytes:
    body = json.dumps(obj).encode()
    return struct.pack(">I", len(body)) + body


def _read_plain(sock: socket.socket) -> dict:
    return wire._read_plain(sock)


# -- the handshake against a real coordinator ------------------------------------------------------------------

def test_the_right_secret_opens_a_channel_that_carries_requests_without_the_secret_on_the_wire():
    with serving(SECRET) as rc:
        rec = _connect(rc.port)
        try:
            channel = client_handshake(rec, SECRET, address=rc.address)
            channel.send({"op": "attach", "site": 0, "worker": 0, "incarnation": "t"})
            assert channel.recv() == {"ok": True}
            channel.send({"op": "set", "key": "k", "value": "cafe"})
            assert channel.recv() == {"ok": True}
            channel.send({"op": "status"})
            status = channel.recv()
        finally:
            rec.close()
        assert status["gen"] == -1 and status["formed"] is False and status["sites"] == {}
        assert rc.call(lambda: dict(rc.coordinator.store)) == {"k": b"\xca\xfe"}
        hello = json.loads(_frames(bytes(rec.sent))[0])
        assert hello["hello"] == "geotrain" and hello["version"] == PROTOCOL_VERSION
        assert len(bytes.fromhex(hello["nonce"])) == 32
        assert _leaks(rec.transcript, SECRET) == []


def test_each_handshake_has_fresh_nonces_so_a_recorded_frame_cannot_be_replayed_on_another_connection():
    with serving(SECRET) as rc:
        first, second = _connect(rc.port), _connect(rc.port)
        try:
            a = client_handshake(first, SECRET, address=rc.address)
            handshake_bytes = len(first.sent)
            a.send({"op": "attach", "site": 0, "worker": 0, "incarnation": "t"})
            assert a.recv() == {"ok": True}
            recorded_attach = bytes(first.sent[handshake_bytes:])
            b = client_handshake(second, SECRET, address=rc.address)
            nonces = [json.loads(_frames(bytes(r.sent))[0])["nonce"] for r in (first, second)]
            server_nonces = [json.loads(_frames(bytes(r.received))[0])["nonce"] for r in (first, second)]
            assert nonces[0] != nonces[1] and server_nonces[0] != server_nonces[1]
            # the first connection's attach, MAC and all, sent again on the second: the coordinator hangs up
            second.sock.sendall(recorded_attach)
            with pytest.raises(WireError):
                b.recv()
            assert rc.call(lambda: rc.coordinator.requests) == 0  # nothing past the join reached a request
        finally:
            first.close()
            second.close()


def test_a_site_with_another_secret_is_told_so_before_it_proves_anything():
    with serving(SECRET) as rc:
        rec = _connect(rc.port)
        try:
            with pytest.raises(AuthError) as info:
                client_handshake(rec, OTHER, address=rc.address)
        finally:
            rec.close()
        e = info.value
        assert isinstance(e, ConfigError) and e.field == "coordinator"
        assert rc.address in str(e) and "does not hold this site's secret" in str(e)
        assert "--token-file" in str(e)  # the fix
        # the site sent its hello and nothing more: no proof made with its secret went out
        (hello,) = _frames(bytes(rec.sent))
        assert set(json.loads(hello)) == {"hello", "version", "nonce"}
        assert _leaks(rec.transcript, SECRET) == [] and _leaks(rec.transcript, OTHER) == []


def test_the_coordinator_refuses_a_proof_made_with_another_secret_and_hangs_up():
    with serving(SECRET) as rc:
        rec = _connect(rc.port)
        try:
            nonce = os.urandom(32)
            rec.sendall(_plain({"hello": "geotrain", "version": PROTOCOL_VERSION, "nonce": nonce.hex()}))
            reply = _read_plain(rec)
            server_nonce = bytes.fromhex(reply["nonce"])
            # the coordinator proved it holds the run's secret (and would not prove another)
            assert bytes.fromhex(reply["proof"]) == server_proof(SECRET, nonce, server_nonce)
            assert bytes.fromhex(reply["proof"]) != server_proof(OTHER, nonce, server_nonce)
            rec.sendall(_plain({"proof": client_proof(OTHER, nonce, server_nonce).hex()}))
            verdict = _read_plain(rec)
            assert verdict == {"ok": False, "error": "authentication failed: this site holds another secret"}
            assert rec.recv(1) == b""  # the connection is closed
        finally:
            rec.close()
        assert rc.call(lambda: (rc.coordinator.sites, rc.coordinator.requests)) == ({}, 0)
        assert _leaks(rec.transcript, SECRET) == [] and _leaks(rec.transcript, OTHER) == []


@pytest.mark.parametrize("hello", [
    {"hello": "geotrain", "version": PROTOCOL_VERSION + 1, "nonce": "00" * 32},
    {"hello": "http", "version": PROTOCOL_VERSION, "nonce": "00" * 32},
])
def test_a_peer_that_does_not_speak_the_protocol_is_refused_with_the_reason(hello):
    with serving(SECRET) as rc:
        rec = _connect(rc.port)
        try:
            rec.sendall(_plain(hello))
            reply = _read_plain(rec)
            assert reply == {"error": f"expected a geotrain site speaking protocol {PROTOCOL_VERSION}"}
            assert rec.recv(1) == b""
        finally:
            rec.close()
        # and the coordinator goes on serving proper sites
        good = _connect(rc.port)
        try:
            channel = client_handshake(good, SECRET, address=rc.address)
            channel.send({"op": "attach", "site": 0, "worker": 0, "incarnation": "t"})
            assert channel.recv() == {"ok": True}
        finally:
            good.close()


@pytest.mark.parametrize("opening", [
    {"hello": "geotrain", "version": PROTOCOL_VERSION},  # no nonce
    {"hello": "geotrain", "version": PROTOCOL_VERSION, "nonce": 5},  # a nonce that is not text
    "attach without a site",  # authenticated, then a first message the coordinator cannot read
])
def test_a_peer_that_opens_with_a_malformed_message_is_told_and_hung_up_on_without_an_unhandled_error(opening):
    errors = _Collect()
    with serving(SECRET) as rc:
        sock = socket.create_connection(("127.0.0.1", rc.port), timeout=30)
        logging.getLogger("asyncio").addHandler(errors)  # where the coordinator's event loop reports
        try:
            if opening == "attach without a site":
                channel = client_handshake(sock, SECRET, address=rc.address)
                channel.send({"op": "attach"})
                assert channel.recv() == {"refused": "malformed attach ('site')"}
            else:
                sock.sendall(_plain(opening))
                assert _read_plain(sock) == {"error": f"expected a geotrain site speaking protocol {PROTOCOL_VERSION}"}
            assert sock.recv(1) == b""  # hung up on
            wait_until(lambda: rc.call(lambda: not rc.coordinator._tasks), what="the connection to end")
        finally:
            logging.getLogger("asyncio").removeHandler(errors)
            sock.close()
    assert errors.messages == []


class _Collect(logging.Handler):
    """Keeps the messages of the errors logged while it is attached."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def test_a_tampered_frame_on_a_real_connection_is_not_executed_and_ends_the_connection():
    with serving(SECRET) as rc:
        rec = _connect(rc.port)
        try:
            channel = client_handshake(rec, SECRET, address=rc.address)
            channel.send({"op": "attach", "site": 0, "worker": 0, "incarnation": "t"})
            assert channel.recv() == {"ok": True}
            frame = bytearray(channel.seal({"op": "set", "key": "k", "value": "01"}))
            i = frame.index(b'"01"') + 2
            frame[i] ^= 0x01  # "01" -> "00": still valid JSON, no longer what was MACed
            rec.sock.sendall(bytes(frame))
            with pytest.raises(WireError):
                channel.recv()
        finally:
            rec.close()
        assert rc.call(lambda: (dict(rc.coordinator.store), rc.coordinator.requests)) == ({}, 0)


# -- the handshake against scripted peers (socket pairs) --------------------------------------------------------

def _scripted(server_bytes: bytes, *, close: bool = False) -> tuple[socket.socket, socket.socket]:
    site, peer = socket.socketpair()
    site.settimeout(30)
    peer.sendall(server_bytes)
    if close:
        peer.shutdown(socket.SHUT_WR)
    return site, peer


def test_a_coordinator_that_refuses_the_hello_is_reported_with_its_reason():
    site, peer = _scripted(_plain({"error": "this coordinator is draining"}))
    try:
        with pytest.raises(AuthError, match="refused the connection: this coordinator is draining"):
            client_handshake(site, SECRET, address="127.0.0.1:1")
    finally:
        site.close()
        peer.close()


def test_a_refusal_after_a_good_server_proof_is_reported_with_its_reason():
    site, peer = socket.socketpair()
    site.settimeout(30)
    peer.settimeout(30)
    try:
        def serve() -> None:
            hello = wire._read_plain(peer)
            nonce, mine = bytes.fromhex(hello["nonce"]), os.urandom(32)
            peer.sendall(_plain({"nonce": mine.hex(), "proof": server_proof(SECRET, nonce, mine).hex()}))
            answer = wire._read_plain(peer)
            assert bytes.fromhex(answer["proof"]) == client_proof(SECRET, nonce, mine)
            peer.sendall(_plain({"ok": False, "error": "site 3 is not expected"}))

        t = threading.Thread(target=serve, daemon=True)
        t.start()
        with pytest.raises(AuthError, match="refused this site: site 3 is not expected"):
            client_handshake(site, SECRET, address="127.0.0.1:1")
        t.join(30)
        assert not t.is_alive()
    finally:
        site.close()
        peer.close()


@pytest.mark.parametrize("server_bytes, message", [
    (struct.pack(">I", 1 << 20) + b"x" * 16, "not a geotrain coordinator"),  # too long for a handshake
    (struct.pack(">I", 5) + b"hello", "malformed handshake frame"),  # not JSON
    (struct.pack(">I", 9) + b"[1, 2, 3]", "malformed handshake frame"),  # JSON, not an object
    (_plain({"nonce": "zz", "proof": "00"}), "is not a geotrain coordinator"),  # not hex
    (b"", "connection closed"),
])
def test_a_peer_that_is_not_a_coordinator_is_a_wire_error(server_bytes, message):
    site, peer = _scripted(server_bytes, close=True)
    try:
        with pytest.raises(WireError, match=message):
            client_handshake(site, SECRET, address="127.0.0.1:1")
    finally:
        site.close()
        peer.close()


# -- MACed frames -----------------------------------------------------------------------------------------------

def _pair(key: bytes = b"k" * 32) -> tuple[Channel, Channel]:
    """A site's channel and the coordinator's, as the handshake leaves them (no sockets needed for seal/open)."""
    return Channel(None, key, is_client=True), Channel(None, key, is_client=False)  # type: ignore[arg-type]


def test_frames_round_trip_both_ways_in_order():
    site, coord = _pair()
    for i in range(3):
        assert coord.open(site.seal({"op": "set", "i": i})[4:]) == {"op": "set", "i": i}
        assert site.open(coord.seal({"ok": True, "i": i})[4:]) == {"ok": True, "i": i}


def test_the_session_key_depends_on_the_secret_and_both_nonces():
    a, b = os.urandom(32), os.urandom(32)
    keys = {session_key(SECRET, a, b), session_key(OTHER, a, b), session_key(SECRET, b, a),
            session_key(SECRET, a, os.urandom(32))}
    assert len(keys) == 4 and all(len(k) == 32 for k in keys)
    assert session_key(SECRET, a, b) not in (server_proof(SECRET, a, b), client_proof(SECRET, a, b))


@pytest.mark.parametrize("where", ["mac first", "mac last", "body first", "body middle", "body last"])
def test_a_frame_with_one_flipped_bit_fails_its_mac(where):
    site, coord = _pair()
    frame = bytearray(site.seal({"op": "sum", "name": "eval", "values": [1.5, 2.5]})[4:])
    i = {"mac first": 0, "mac last": 31, "body first": 32, "body middle": 32 + (len(frame) - 32) // 2,
         "body last": len(frame) - 1}[where]
    frame[i] ^= 0x04
    with pytest.raises(WireError, match="failed its MAC"):
        coord.open(bytes(frame))


def test_a_replayed_a_reordered_a_reflected_and_a_foreign_frame_all_fail():
    site, coord = _pair()
    first, second = site.seal({"n": 1})[4:], site.seal({"n": 2})[4:]
    with pytest.raises(WireError, match="failed its MAC"):
        coord.open(second)  # reordered: the coordinator expects sequence 0
    assert coord.open(first) == {"n": 1}
    with pytest.raises(WireError, match="failed its MAC"):
        coord.open(first)  # replayed
    assert coord.open(second) == {"n": 2}
    with pytest.raises(WireError, match="failed its MAC"):
        Channel(None, b"k" * 32, is_client=True).open(  # type: ignore[arg-type]
            Channel(None, b"k" * 32, is_client=True).seal({"n": 1})[4:])  # reflected back to a site
    with pytest.raises(WireError, match="failed its MAC"):
        _pair(b"x" * 32)[1].open(_pair(b"y" * 32)[0].seal({"n": 1})[4:])  # made under another session key


def test_a_frame_shorter_than_its_mac_or_with_a_body_that_is_not_json_is_refused():
    site, coord = _pair()
    with pytest.raises(WireError, match="shorter than its MAC"):
        coord.open(b"\x00" * 31)
    key = b"k" * 32
    body = b"{not json"
    mac = wire._mac(key, b"c", (0).to_bytes(8, "big"), body)
    with pytest.raises(WireError, match="malformed frame body"):
        coord.open(mac + body)


def test_recv_refuses_a_frame_longer_than_the_limit_and_a_closed_connection():
    a, b = socket.socketpair()
    try:
        a.settimeout(30)
        channel = Channel(a, b"k" * 32, is_client=True)
        b.sendall(struct.pack(">I", MAX_FRAME + 33))
        with pytest.raises(WireError, match="exceeds"):
            channel.recv()
        b.close()
        with pytest.raises(WireError):
            channel.recv()
    finally:
        a.close()
        b.close()


# -- token files ------------------------------------------------------------------------------------------------

def test_a_token_file_is_created_private_with_a_fresh_secret_and_read_back(tmp_path):
    path = tmp_path / "deeper" / "run.token"
    secret = create_token_file(path)
    assert len(secret) == 32
    assert path.read_text(encoding="ascii") == secret.hex() + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert read_token_file(path) == secret
    assert create_token_file(tmp_path / "another.token") != secret


def test_creating_a_token_file_never_overwrites_one(tmp_path):
    path = tmp_path / "run.token"
    secret = create_token_file(path)
    with pytest.raises(FileExistsError):
        create_token_file(path)
    assert read_token_file(path) == secret


def test_a_missing_token_file_is_bad_input_that_says_how_to_make_one(tmp_path):
    path = tmp_path / "absent.token"
    with pytest.raises(ConfigError) as info:
        read_token_file(path)
    assert info.value.field == "--token-file"
    assert str(info.value).startswith("--token-file: ")
    assert str(path) in str(info.value) and "geotrain coordinator --token-file" in str(info.value)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o644, 0o700 | 0o004])
def test_a_token_file_others_can_read_is_refused_with_the_chmod_that_fixes_it(tmp_path, mode):
    path = tmp_path / "run.token"
    secret = create_token_file(path)
    path.chmod(mode)
    with pytest.raises(ConfigError) as info:
        read_token_file(path)
    message = str(info.value)
    assert f"(mode {mode:o})" in message and f"chmod 600 {path}" in message
    assert secret.hex() not in message


@pytest.mark.parametrize("text", ["", "\n", "not hex at all\n", "abc\n", "00" * 15 + "\n", "zz" * 32 + "\n"])
def test_a_token_file_without_a_long_enough_hex_secret_is_refused(tmp_path, text):
    path = tmp_path / "run.token"
    path.write_text(text, encoding="ascii")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16 bytes in hex on its first line") as info:
        read_token_file(path)
    assert info.value.field == "--token-file"


def test_a_token_file_keeps_its_first_line_and_ignores_surrounding_whitespace(tmp_path):
    path = tmp_path / "run.token"
    path.write_text("  " + "ab" * 16 + "  \nsecond line is a comment\n", encoding="ascii")
    path.chmod(0o600)
    assert read_token_file(path) == b"\xab" * 16  # 16 bytes: the shortest secret accepted


@pytest.mark.parametrize("kind", ["directory", "not ascii"])
def test_a_token_file_that_cannot_be_read_says_so(tmp_path, kind):
    path = tmp_path / "run.token"
    if kind == "directory":
        path.mkdir(mode=0o700)
    else:
        path.write_bytes("é".encode() * 40)
        path.chmod(0o600)
    with pytest.raises(ConfigError, match="cannot read"):
        read_token_file(path)


def test_a_token_file_error_names_the_field_the_caller_gives(tmp_path):
    with pytest.raises(ConfigError) as info:
        read_token_file(tmp_path / "absent", field="membership.token_file")
    assert info.value.field == "membership.token_file"
    assert str(info.value).startswith("membership.token_file: ")


def test_the_coordinator_command_exits_2_on_a_bad_token_file(tmp_path, capsys):
    path = tmp_path / "run.token"
    create_token_file(path)
    path.chmod(0o644)
    assert coordinator_main(["--port", "0", "--token-file", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --token-file: ") and "chmod 600" in err
