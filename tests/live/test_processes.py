"""Process and port management (psutil): liveness, zombies, reused pids, polite then firm stops."""

from __future__ import annotations

import socket
import subprocess
import sys
import time

from sagesched.live.processes import cmdline_contains, free_port, is_alive, port_problem, terminate


def test_liveness_zombies_and_cmdline() -> None:
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)  # sagesched-test-marker"])
    try:
        assert is_alive(proc.pid)
        # Popen returns once exec has begun; the kernel fills the new command line in a moment
        # later (a loaded machine showed an empty one), so wait for it.
        deadline = time.monotonic() + 10
        while not cmdline_contains(proc.pid, "sagesched-test-marker") and time.monotonic() < deadline:
            time.sleep(0.01)
        assert cmdline_contains(proc.pid, "sagesched-test-marker")
        assert not cmdline_contains(proc.pid, "something-else")
        proc.kill()  # soon a zombie: exited, not reaped, which must count as gone
        deadline = time.monotonic() + 10  # generous: a loaded machine may take a while to deliver it
        while is_alive(proc.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert not is_alive(proc.pid)
        assert proc.poll() is not None  # it was a zombie until this reaped it
    finally:
        proc.kill()
        proc.wait()
    assert not is_alive(proc.pid)


def test_terminate_politely_then_firmly() -> None:
    polite = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    assert terminate(polite.pid, timeout_s=5) is True
    polite.wait(5)
    stubborn = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(30)",
        ],
        stdout=subprocess.PIPE,
    )
    assert stubborn.stdout is not None and stubborn.stdout.readline().strip() == b"ready"
    assert terminate(stubborn.pid, timeout_s=0.5) is False  # ignored SIGTERM: killed
    assert stubborn.wait(5) == -9  # the real status: terminate() polls, it does not reap our child


def test_port_problem_names_the_fix() -> None:
    port = free_port()
    assert port_problem("127.0.0.1", port) is None
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        problem = port_problem("127.0.0.1", port)
    assert problem is not None and "--port" in problem
