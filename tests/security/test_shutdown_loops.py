"""Shutdown under TLS with a bearer token, over and over: nothing deadlocks.

grpcio's shutdown can deadlock with metadata-plugin call credentials (a C thread waits on
core's locks while holding the GIL). The SDK sends its token as static call metadata, so
these loops show that neither a client's close, a server's stop, nor the server's drain
after SIGTERM hangs:

- ``test_tls_token_call_and_shutdown_loop``: `LOOPS` times, a TLS fake in a child process,
  an SDK client with a token calls it, closes, and the fake stops; every stop is clean
  (none needs a kill) and bounded;
- ``test_drain_under_tls_loop``: `SIGTERMS` times, ``resnet-serve serve`` with TLS and a
  token under load from SDK clients, then SIGTERM: every client call ends OK or
  UNAVAILABLE, every client closes, the server exits 0 within its grace period.

Marked ``soak`` (about 2 and 4 minutes here); run them alone::

    .venv/bin/pytest -m soak tests/security/test_shutdown_loops.py

``RESNET_SERVE_LOOPS`` and ``RESNET_SERVE_SIGTERMS`` change the counts for a try.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import grpc
import pytest
from resnet_serve_client import TLS, ChannelOptions, Client, Unavailable

from bench import serving
from tests.fixtures.fake_classifier import MODEL, STOP_TIMEOUT, FakeServer, FakeTLS
from tests.reliability import images
from tests.security.certs import PKI

LOOPS = int(os.environ.get("RESNET_SERVE_LOOPS", 200))
SIGTERMS = int(os.environ.get("RESNET_SERVE_SIGTERMS", 50))
TOKEN = "loop-token-5b1e"
GRACE_SECONDS = 10.0
CLIENTS = 4


@pytest.mark.soak
@pytest.mark.timeout(LOOPS * 3 * STOP_TIMEOUT)
def test_tls_token_call_and_shutdown_loop(pki: PKI) -> None:
    tls = FakeTLS(key=pki.server_key.read_bytes(), certificate=pki.server_cert.read_bytes())
    options = ChannelOptions(tls=TLS(root_certificates=pki.ca), token=TOKEN, retry=None)
    slowest = 0.0
    for loop in range(LOOPS):
        fake = FakeServer(tls)
        try:
            with Client(fake.target, model=MODEL, options=options, timeout=10) as client:
                assert client.classify(b"abc")[0].top.index == 3
            assert fake.script.metadata[0]["authorization"] == f"Bearer {TOKEN}"
        finally:
            started = time.monotonic()
            clean = fake.stop()
            slowest = max(slowest, time.monotonic() - started)
        assert clean, f"loop {loop}: the fake's shutdown hung and was killed"
    print(f"{LOOPS} TLS+token loops, slowest stop {slowest * 1000:.0f} ms")


@pytest.mark.soak
@pytest.mark.timeout(SIGTERMS * (GRACE_SECONDS + 60))
def test_drain_under_tls_loop(cifar_repo: Path, pki: PKI, tmp_path: Path) -> None:
    jpeg = images.jpeg(images.photo())
    options = ChannelOptions(tls=TLS(root_certificates=pki.ca), token=TOKEN, retry=None)
    exits = []
    for round_ in range(SIGTERMS):
        server = serving.start(
            cifar_repo, tmp_path / f"{round_}" / "server.log",
            ["--tls-cert", str(pki.server_cert), "--tls-key", str(pki.server_key),
             "--grace-period", str(GRACE_SECONDS)],
            credentials=grpc.ssl_channel_credentials(pki.ca.read_bytes()),
            env={"RESNET_SERVE_AUTH_TOKEN": TOKEN},
        )  # fmt: skip
        codes: list[str] = []
        answered = threading.Semaphore(0)
        clients = [
            threading.Thread(target=_load, args=(server, options, jpeg, codes, answered),
                             daemon=True)
            for _ in range(CLIENTS)
        ]  # fmt: skip
        for thread in clients:
            thread.start()
        for _ in range(CLIENTS * 2):
            assert answered.acquire(timeout=60), server.log()
        signalled = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        for thread in clients:
            thread.join(GRACE_SECONDS + 30)
            assert not thread.is_alive(), f"round {round_}: a client hung at shutdown"
        code = server.stop(timeout=GRACE_SECONDS + 30)
        exits.append(time.monotonic() - signalled)
        assert code == 0, server.log()
        assert set(codes) <= {"OK", "UNAVAILABLE"} and codes.count("UNAVAILABLE") == CLIENTS
    print(f"{SIGTERMS} SIGTERMs under TLS load: exit 0 each, slowest {max(exits):.2f} s")


def _load(server: serving.Server, options: ChannelOptions, jpeg: bytes, codes: list[str],
          answered: threading.Semaphore) -> None:  # fmt: skip
    """Classify back to back until the draining server answers UNAVAILABLE."""
    with Client(server.address, model="cifar", options=options, timeout=30) as client:
        while True:
            try:
                client.classify(jpeg)
            except Unavailable:
                codes.append("UNAVAILABLE")
                return
            codes.append("OK")
            answered.release()
