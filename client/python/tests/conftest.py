"""A real `logitd serve` on the SmolLM2 teacher for the Python package's tests.

The server binary is target/debug/logitd (override: LOGITD_BIN) and the teacher
~/.cache/logitd/teachers/SmolLM2-135M-Instruct.Q4_1.gguf (tests/fetch-teachers.sh);
a missing one fails the session. Servers listen on 127.0.0.1, every wait has a
deadline, and a failing test prints the log of every server it started.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[3]
STARTUP_S = 120.0


def _binary(name: str, env: str) -> Path:
    p = Path(os.environ.get(env, REPO / "target" / "debug" / name))
    if not p.is_file():
        pytest.fail(
            f"{p} is missing: build it with `cargo build --workspace --bin logitd --bin logitd-client` "
            f"(or set {env})",
            pytrace=False,
        )
    return p


def teacher_path() -> Path:
    # Where tests/fetch-teachers.sh puts it: $LOGITD_CACHE, else $XDG_CACHE_HOME/logitd.
    if os.environ.get("LOGITD_CACHE"):
        cache = Path(os.environ["LOGITD_CACHE"])
    else:
        cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "logitd"
    p = cache / "teachers" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not p.is_file():
        pytest.fail(f"{p} is missing: run tests/fetch-teachers.sh all", pytrace=False)
    return p


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVERS: list["Server"] = []


class Server:
    """`logitd serve --model SmolLM2 --listen 127.0.0.1:PORT` as a child process."""

    def __init__(self, port: int = 0, extra: tuple[str, ...] = ()):
        self.requested_port = port
        self.extra = extra
        self.log_path = Path(tempfile.mkstemp(prefix="logitd-serve-", suffix=".log")[1])
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        _SERVERS.append(self)
        self.start()

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        argv = [
            str(_binary("logitd", "LOGITD_BIN")),
            "serve",
            "--model",
            str(teacher_path()),
            "--listen",
            f"127.0.0.1:{self.port or self.requested_port}",
            "--metrics-listen",
            "127.0.0.1:0",
            *self.extra,
        ]
        log = open(self.log_path, "ab")
        log_start = log.tell()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=log)
        log.close()
        line: list[bytes] = []
        reader = threading.Thread(target=lambda: line.append(self.proc.stdout.readline()), daemon=True)
        reader.start()
        reader.join(STARTUP_S)
        if not line or not line[0]:
            self.stop()
            pytest.fail(
                f"logitd serve printed no address within {STARTUP_S} s; log:\n{self.log()}",
                pytrace=False,
            )
        # Keep draining stdout so the server never blocks on a full pipe.
        threading.Thread(target=lambda: shutil.copyfileobj(self.proc.stdout, open(os.devnull, "wb")), daemon=True).start()
        self.first_line = line[0].decode(errors="replace")
        m = re.search(rb"gRPC on 127\.0\.0\.1:(\d+)", line[0])
        assert m, f"unexpected first line {line[0]!r}; log:\n{self.log()}"
        self.port = int(m.group(1))
        h = re.search(rb"HTTP on 127\.0\.0\.1:(\d+)", line[0])
        self.http_port = int(h.group(1)) if h else None
        self.wait_serving(log_start)

    def wait_serving(self, log_start: int) -> None:
        """Waits for the server's `serving` log line (written once the teacher is
        loaded and warmed up; a debug build on a slow CPU takes a while), or fails
        the test if the process exits or the line does not come within STARTUP_S."""
        deadline = time.monotonic() + STARTUP_S
        while True:
            with open(self.log_path, "rb") as f:
                f.seek(log_start)
                if re.search(rb"\bserving grpc_addr=", f.read()):
                    return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                pytest.fail(
                    f"logitd serve did not reach `serving` within {STARTUP_S} s "
                    f"(exit status {self.proc.returncode}); log:\n{self.log()}",
                    pytrace=False,
                )
            time.sleep(0.05)

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-20000:]
        except OSError as e:
            return f"(no log: {e})"


@pytest.fixture(scope="session")
def server():
    s = Server()
    yield s
    s.stop()


@pytest.fixture(scope="session")
def client(server):
    import logitd

    return logitd.TeacherClient(server.uri, timeout_s=120.0)


@pytest.fixture(scope="session")
def logitd_client_bin() -> Path:
    return _binary("logitd-client", "LOGITD_CLIENT_BIN")


def sequences(n: int, salt: int = 0, vocab: int = 49152) -> list[list[int]]:
    """n token sequences of lengths 3..17 with ids spread over the vocabulary."""
    return [
        [(p * 7919 + i * 104729 + salt * 31) % vocab for p in range(3 + (i * 5 + salt) % 15)]
        for i in range(n)
    ]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for s in _SERVERS:
            rep.sections.append((f"logitd serve log ({s.log_path})", s.log()))


def pytest_sessionfinish(session, exitstatus):
    for s in _SERVERS:
        s.stop(signal.SIGKILL)
