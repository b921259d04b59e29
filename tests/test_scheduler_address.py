"""--scheduler addresses that are malformed, or where no dask scheduler answers.

Refused in one line naming --scheduler, before anything is written: a malformed address at once;
a closed port, a server that says nothing, a web server, one that hangs up, within a bounded
handshake (the servers bind port 0).
"""
from __future__ import annotations

import socket
import threading
import time

import pytest

from tests.hostile import refuse
from tests.hostile import fresh, model, out, pristine  # noqa: F401 (fixtures)


@pytest.mark.parametrize("address", ["tcp://host", "tcp://host:", "tcp://host:0", "tcp://host:70000",
                                     "tcp://:8786", "tcp://host:-1", "tcp://host:87 86", "host:8786", ""])
def test_bad_scheduler_addresses_are_refused(model, out, address):
    refuse(model, out, "--scheduler", extra=("--scheduler", address))


@pytest.fixture
def fake_server():
    """fake_server(behaviour) -> tcp://127.0.0.1:PORT of a server that is not a dask scheduler:
    "silent" accepts and says nothing, "http" answers like a web server, "close" hangs up."""
    servers, conns = [], []

    def start(behaviour: str) -> str:
        srv = socket.socket()
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        servers.append(srv)

        def serve():
            while True:
                try:
                    conn, _ = srv.accept()
                except OSError:
                    return
                conns.append(conn)
                if behaviour == "http":
                    conn.sendall(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                elif behaviour == "close":
                    conn.close()
        threading.Thread(target=serve, daemon=True).start()
        return f"tcp://127.0.0.1:{srv.getsockname()[1]}"
    yield start
    for s in servers + conns:
        s.close()


def closed_port() -> str:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return f"tcp://127.0.0.1:{port}"


@pytest.mark.parametrize("behaviour", ["silent", "http", "close", "closed port"])
def test_a_scheduler_address_where_no_dask_scheduler_answers_is_refused_before_anything_is_written(
        fresh, out, fake_server, behaviour):
    model = fresh("spm")
    address = closed_port() if behaviour == "closed port" else fake_server(behaviour)
    started = time.monotonic()
    line = refuse(model, out, "--scheduler", address, extra=("--scheduler", address), timeout=90)
    assert time.monotonic() - started < 40, "the handshake is bounded"
    assert not (out.parent / "m.gguf.work").exists()
    if behaviour == "silent":
        assert "handshake" in line
