"""A real ``redis-server`` for the tests: on a loopback port, in a temporary folder, no disk writes.

``redis_server`` (a fixture in conftest.py terms: import it from here) starts
one; the test may ``kill()`` it (SIGKILL, an outage), ``pause()`` it
(SIGSTOP: it holds connections open and answers nothing) and ``start()`` it
again on the same port (empty, as a restarted Redis without persistence is).
Fails with the install command when ``redis-server`` is missing
(``tools/setup.sh`` installs Debian's).
"""

import os
import shutil
import signal
import socket
import subprocess
import time

import pytest

REDIS_MISSING = ("redis-server not found: the Redis tests need Debian's redis-server "
                 "(`apt-get install redis-server`; tools/setup.sh installs it)")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """One ``redis-server`` process on ``127.0.0.1:port`` with its files in ``folder``."""

    def __init__(self, folder):
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            pytest.fail(REDIS_MISSING, pytrace=False)
        self.folder, self.port, self.proc = str(folder), None, None

    @property
    def url(self):
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout=20.0):
        """Start (again, on the same port once it has one); returns once it answers PING."""
        import redis

        for _ in range(5):  # a port taken between picking and binding: pick another
            port = self.port or _free_port()
            self.proc = subprocess.Popen(
                [self.exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.folder, "--daemonize", "no",
                 "--logfile", os.path.join(self.folder, "redis.log")],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            client = redis.Redis(host="127.0.0.1", port=port, socket_timeout=1.0)
            end = time.monotonic() + timeout  # a guard against a hang only
            while time.monotonic() < end and self.proc.poll() is None:
                try:
                    client.ping()
                    client.close()
                    self.port = port
                    return self
                except redis.ConnectionError:
                    time.sleep(0.02)
            client.close()
            self.stop()
            if self.port is not None:
                time.sleep(0.2)  # the old process's socket: try the same port again
        raise AssertionError(f"redis-server did not start; see {self.folder}/redis.log")

    def client(self, **kw):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **kw)

    def kill(self):
        """SIGKILL: every connection drops, every bucket is gone."""
        self.stop()

    def pause(self):
        """SIGSTOP: connections stay open and nothing answers (a hung Redis)."""
        self.proc.send_signal(signal.SIGSTOP)

    def resume(self):
        self.proc.send_signal(signal.SIGCONT)

    def stop(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    """A started :class:`RedisServer`, stopped after the test."""
    folder = tmp_path / "redis"
    folder.mkdir()
    server = RedisServer(folder).start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def shared_redis(tmp_path_factory):
    """One started :class:`RedisServer` for a whole module (tests flush it as they need)."""
    server = RedisServer(tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()
