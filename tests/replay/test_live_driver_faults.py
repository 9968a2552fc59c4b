"""Live drivers against misbehaving servers and bad knobs: every request ends once, with a clear
reason, within the configured timeouts; a bad knob fails before the run, naming the override."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pandas as pd
import pytest

from sagesched.experiment import run
from sagesched.replay.config import DriverConfig
from sagesched.typed_config import ConfigFieldError
from tests.replay.conftest import compose_config

N = 6


def _read_request(conn: socket.socket) -> str | None:
    """Read one HTTP request; return its request line (None at EOF)."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n")[1:]:
        key, _, value = line.partition(b":")
        if key.strip().lower() == b"content-length":
            length = int(value)
    while len(body) < length:
        chunk = conn.recv(65536)
        if not chunk:
            break
        body += chunk
    return head.split(b"\r\n")[0].decode()


def _answer_health_then(conn: socket.socket) -> bool:
    """Answer GETs (health probes) with 200 until a POST arrives; False at EOF."""
    while True:
        line = _read_request(conn)
        if line is None:
            return False
        if not line.startswith("GET"):
            return True
        conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")


def _hang(conn: socket.socket) -> None:
    """Healthy, but never answers a request."""
    if _answer_health_then(conn):
        time.sleep(600)


def _trickle(conn: socket.socket) -> None:
    """Healthy; answers a request with a stream that sends a content chunk every 0.3 s and never ends."""
    if not _answer_health_then(conn):
        return
    conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n")
    event = b'data: {"choices":[{"delta":{"content":"x"}}]}\n\n'
    while True:
        conn.sendall(b"%x\r\n%s\r\n" % (len(event), event))
        time.sleep(0.3)


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[socket.socket], None]], str]]:
    sockets: list[socket.socket] = []

    def start(handler: Callable[[socket.socket], None]) -> str:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        sockets.append(sock)

        def accept() -> None:
            while True:
                try:
                    conn, _ = sock.accept()
                except OSError:
                    return

                def handle(c: socket.socket = conn) -> None:
                    try:
                        handler(c)
                    except OSError:
                        pass
                    finally:
                        c.close()

                threading.Thread(target=handle, daemon=True).start()

        threading.Thread(target=accept, daemon=True).start()
        return f"http://127.0.0.1:{sock.getsockname()[1]}"

    yield start
    for sock in sockets:
        sock.close()


@pytest.fixture
def trace(tmp_path: Path) -> list[str]:
    path = tmp_path / "trace.csv"
    rows = "".join(f"{0.2 * i:.1f},20,5\n" for i in range(N))
    path.write_text("arrival_s,prompt_tokens,output_tokens\n" + rows)
    return [
        "workload=csv",
        f"workload.trace_path={path}",
        "driver.prompts.calibrate=false",
        "driver.timeline_interval_s=0",
        "driver.progress=false",
    ]


def _mode(mode: str, url: str) -> list[str]:
    if mode == "endpoint":
        return ["driver=endpoint", f"driver.endpoint.url={url}"]
    return ["driver=live", "cluster=emulators", f"cluster.instances.0.url={url}", f"cluster.instances.1.url={url}"]


def _replay(overrides: list[str], out: Path) -> tuple[pd.DataFrame, float]:
    started = time.monotonic()
    run(compose_config(overrides), out, progress=False)
    records = pd.read_parquet(out / "requests.parquet")
    assert len(records) == N and records["request_id"].is_unique
    ended = records.dropna(subset=["dispatch_s"])
    assert (ended["dispatch_s"] >= ended["arrival_s"]).all() and (ended["finish_s"] >= ended["dispatch_s"]).all()
    return records, time.monotonic() - started


@pytest.mark.parametrize("mode", ["endpoint", "policy"])
def test_a_stream_that_never_ends_fails_at_the_request_timeout(serve, trace, tmp_path, mode):
    """request_timeout_s bounds a request from its arrival in both modes, even when bytes keep coming."""
    url = serve(_trickle)
    timeouts = ["driver.request_timeout_s=1.5", "driver.drain_timeout_s=120"]
    records, wall = _replay([*trace, *_mode(mode, url), *timeouts], tmp_path)
    assert (records["outcome"] == "failed").all()
    assert records["reason"].str.startswith("upstream_timeout").all(), records["reason"].tolist()
    assert (records["e2e_ms"] < 1500 + 1500).all()  # not the 120 s drain
    assert wall < 60


@pytest.mark.parametrize("mode", ["endpoint", "policy"])
def test_requests_cut_by_the_drain_timeout_say_so(serve, trace, tmp_path, mode):
    url = serve(_hang)
    timeouts = ["driver.request_timeout_s=120", "driver.drain_timeout_s=1"]
    records, wall = _replay([*trace, *_mode(mode, url), *timeouts], tmp_path)
    assert (records["outcome"] == "failed").all()
    assert records["reason"].str.startswith("drain_timeout").all(), records["reason"].tolist()
    assert records["reason"].str.contains("driver.drain_timeout_s").all()
    assert wall < 60


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("start_delay_s", float("nan")),
        ("timeline_interval_s", float("nan")),
        ("request_timeout_s", float("nan")),
        ("request_timeout_s", float("inf")),
        ("drain_timeout_s", float("inf")),
    ],
)
def test_non_finite_driver_times_are_refused(key, value):
    with pytest.raises(ConfigFieldError, match=rf"^driver\.{key}: must be a finite number"):
        DriverConfig.from_dict({"name": "live", key: value})


@pytest.mark.parametrize("url", ["127.0.0.1:9000", "notaurl", "ftp://127.0.0.1:9000", "http://127.0.0.1:99999"])
def test_a_malformed_endpoint_url_is_refused_naming_the_override(url):
    with pytest.raises(ConfigFieldError, match=r"^driver\.endpoint\.url: .*driver\.endpoint\.url=http://127\.0\.0\.1"):
        DriverConfig.from_dict({"name": "live", "mode": "endpoint", "endpoint": {"url": url}})


def test_a_well_formed_endpoint_url_is_accepted():
    for url in ("http://127.0.0.1:9000", "http://127.0.0.1:9000/v1", "https://localhost"):
        assert (
            DriverConfig.from_dict({"name": "live", "mode": "endpoint", "endpoint": {"url": url}}).endpoint.url == url
        )
