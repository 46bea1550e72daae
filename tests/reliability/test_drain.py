"""SIGTERM under steady load from both APIs: accepted calls answered, new ones refused, exit 0.

Eight workers call Classify and v2 ModelInfer back to back; SIGTERM arrives
while calls are in flight. Every call ends OK or UNAVAILABLE (none cancelled,
none INTERNAL), calls in flight at the signal are answered after it, later
calls get UNAVAILABLE, and the process exits 0 within the grace period (the
wait allows a generous margin beyond it). The drain of a fixed set of calls
in flight is tests/server/core/test_manager.py; through a load balancer,
tests/deploy/test_nginx_lb.py.

SIGTERM while models are still loading: the loading stops (at most the version whose
session is being opened finishes), and the process exits 0 well before every version
would have been READY.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from pathlib import Path

import grpc
import numpy as np
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2_grpc as pb_grpc
from tritonclient.grpc import service_pb2_grpc as v2_grpc

from bench import serving
from tests.reliability.load import Outcomes, record_call, until_gauges
from tests.reliability.repos import derive
from tests.reliability.wire import classify, float_image, infer_floats

MODEL = "busy"
GRACE_SECONDS = 20.0
WORKERS = 8
CHW = np.random.default_rng(1).standard_normal((3, 224, 224), np.float32)


async def test_sigterm_under_load(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    derive(repo, model_repo / "resnet18", MODEL, max_batch_size=4)
    server = serving.start(repo, tmp_path / "logs" / "server.log",
                           ["--grace-period", str(GRACE_SECONDS), "--instances", "1"])  # fmt: skip
    outcomes = Outcomes()
    try:
        async with grpc.aio.insecure_channel(server.address) as channel:
            classifier = pb_grpc.ClassifierStub(channel)
            v2 = v2_grpc.GRPCInferenceServiceStub(channel)
            calls = [
                lambda: classifier.Classify(classify(MODEL, float_image(CHW)), timeout=120),
                lambda: v2.ModelInfer(infer_floats(MODEL, CHW[None]), timeout=120),
            ]

            async def worker(index: int) -> None:
                call = calls[index % 2]
                while outcomes.codes["UNAVAILABLE"] < WORKERS:
                    await record_call(call, outcomes)

            workers = [asyncio.ensure_future(worker(i)) for i in range(WORKERS)]
            await until_gauges(server, MODEL, inflight=WORKERS // 2)
            signalled = time.monotonic()
            server.process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(asyncio.gather(*workers), GRACE_SECONDS + 60)
        code = await asyncio.to_thread(server.process.wait, GRACE_SECONDS + 30)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()

    report = outcomes.report()
    assert set(outcomes.codes) == {"OK", "UNAVAILABLE"}, report
    answered_after = [t for t in outcomes.finished_at["OK"] if t > signalled]
    assert answered_after, f"no call in flight at SIGTERM was answered after it: {report}"
    assert code == 0, server.log()
    log = server.log()
    assert "SIGTERM received: draining" in log and log.rstrip().endswith("exiting")


LOADING_VERSIONS = 12


async def test_sigterm_while_loading(model_repo: Path, tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    model = derive(repo, model_repo / "resnet18", MODEL)
    for version in range(2, LOADING_VERSIONS + 1):  # the same files, many versions to load
        shutil.copytree(model / "1", model / str(version), copy_function=os.link)
    server = serving.start(repo, tmp_path / "logs" / "server.log",
                           ["--instances", "1"], serving=False)  # fmt: skip
    try:
        # the first version is being loaded (or READY): the others still wait
        deadline = time.monotonic() + serving.START_TIMEOUT
        while "loading model busy" not in server.log():
            assert time.monotonic() < deadline, server.log()
            await asyncio.sleep(0.1)
        server.process.send_signal(signal.SIGTERM)
        code = await asyncio.to_thread(server.process.wait, serving.STOP_TIMEOUT)
    finally:
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait()
    log = server.log()
    assert code == 0, log
    assert "SIGTERM received: draining" in log and log.rstrip().endswith("exiting"), log
    ready = log.count("READY in")
    assert ready < LOADING_VERSIONS, f"all {ready} versions loaded before the exit:\n{log}"
    assert "Traceback" not in log, log
