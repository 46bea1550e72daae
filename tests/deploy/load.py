"""Steady closed-loop load through a load balancer, for the drain-under-load tests.

`Load(target, model).run()` starts CONCURRENCY threads calling Classify (with the
Python SDK) — and, with ``v2=True``, every other thread calling the Open
Inference Protocol v2 ModelInfer on the same channel settings — until told to
stop. Both retry as docs/deploy.md advises behind nginx: gRPC's own retry
policy from the SDK, with CANCELLED added (nginx reports a replica's stream
reset at the instant its port closes as CANCELLED; both calls are pure
functions, so a retry is safe).
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

from tests.deploy import procs

CONCURRENCY = 8
LOAD_LIMIT = 5000  # no more calls than this, whatever happens


def _v2_call(channel: object, model: str) -> Callable[[], None]:
    """A ModelInfer of one all-zero input, shaped as the model's metadata says."""
    import numpy as np
    from tritonclient.grpc import service_pb2 as v2
    from tritonclient.grpc import service_pb2_grpc as v2_grpc

    stub = v2_grpc.GRPCInferenceServiceStub(channel)
    metadata = stub.ModelMetadata(v2.ModelMetadataRequest(name=model), timeout=60)
    (spec,) = metadata.inputs
    shape = [1, *(int(d) for d in spec.shape[1:])]
    assert spec.datatype == "FP32" and all(d > 0 for d in shape), spec
    request = v2.ModelInferRequest(model_name=model)
    request.inputs.add(name=spec.name, datatype="FP32", shape=shape)
    request.raw_input_contents.append(np.zeros(shape, "<f4").tobytes())

    def call() -> None:
        response = stub.ModelInfer(request, timeout=60)
        assert response.model_name == model and response.raw_output_contents

    return call


@dataclass
class Load:
    target: str
    model: str
    v2: bool = False
    image: bytes = field(default_factory=procs.jpeg)
    ok: int = 0
    ok_by_api: Counter[str] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)
    stop: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    sent: int = 0

    def run(self) -> list[threading.Thread]:
        import grpc
        from resnet_serve_client import ChannelOptions, Client, Retry
        from resnet_serve_client.options.channel import sync_channel

        retry = Retry(also_on=(grpc.StatusCode.CANCELLED,))
        options = ChannelOptions(retry=retry)
        client = Client(self.target, model=self.model, timeout=60, options=options)
        self._closers: list[Callable[[], None]] = [client.close]

        def classify() -> None:
            (result,) = client.classify(self.image, top_k=3)
            assert result.model == self.model

        calls: list[tuple[str, Callable[[], None]]] = [("classify", classify)]
        if self.v2:
            channel = sync_channel(self.target, options)
            self._closers.append(channel.close)
            calls.append(("v2", _v2_call(channel, self.model)))

        def worker(index: int) -> None:
            api, call = calls[index % len(calls)]
            while not self.stop.is_set():
                with self.lock:
                    if self.sent >= LOAD_LIMIT:
                        return
                    self.sent += 1
                try:
                    call()
                except Exception as exc:
                    with self.lock:
                        self.failures.append(f"{api}: {type(exc).__name__}: {exc}")
                else:
                    with self.lock:
                        self.ok += 1
                        self.ok_by_api[api] += 1

        threads = [threading.Thread(target=worker, args=(i,), daemon=True)
                   for i in range(CONCURRENCY)]  # fmt: skip
        for thread in threads:
            thread.start()
        return threads

    def wait_for(self, ok: int, what: str) -> None:
        procs.wait_until(lambda: self.ok >= ok or bool(self.failures) or self.sent >= LOAD_LIMIT,
                         None, what, limit=240, every=0.005)  # fmt: skip

    def finish(self, threads: list[threading.Thread]) -> None:
        self.stop.set()
        for thread in threads:
            thread.join(timeout=120)
        for close in self._closers:
            close()
