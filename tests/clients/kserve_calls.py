"""Run inside a venv with KServe's SDK (requirements/kserve.txt), by test_kserve.py: every
call a KServe user makes against resnet-serve, the answers printed as one JSON object.

    python kserve_calls.py HTTP_URL GRPC_ADDRESS MODEL INPUT.npy
"""

from __future__ import annotations

import asyncio
import json
import sys

import numpy as np
from kserve import InferenceGRPCClient, InferenceRESTClient, InferInput, InferRequest, RESTConfig


def _request(model: str, x: np.ndarray, binary: bool) -> InferRequest:
    tensor = InferInput("images", list(x.shape), "FP32")
    tensor.set_data_from_numpy(x, binary_data=binary)
    return InferRequest(model_name=model, infer_inputs=[tensor], request_id="kserve-1")


async def main(http_url: str, grpc_address: str, model: str, x: np.ndarray) -> dict:
    rest = InferenceRESTClient(RESTConfig(protocol="v2", retries=0))
    out: dict = {
        "rest_live": await rest.is_server_live(http_url),
        "rest_ready": await rest.is_server_ready(http_url),
        "rest_model_ready": await rest.is_model_ready(http_url, model),
    }
    for binary in (False, True):
        answer = await rest.infer(http_url, _request(model, x, binary), model_name=model)
        out[f"rest_logits_binary_{binary}"] = answer.outputs[0].as_numpy().tolist()
    await rest.close()
    grpc = InferenceGRPCClient(grpc_address, retries=0)
    out |= {
        "grpc_live": await grpc.is_server_live(),
        "grpc_ready": await grpc.is_server_ready(),
        "grpc_model_ready": await grpc.is_model_ready(model),
    }
    answer = await grpc.infer(_request(model, x, binary=False))
    out["grpc_logits"] = answer.outputs[0].as_numpy().tolist()
    await grpc.close()
    return out


if __name__ == "__main__":
    http_url, grpc_address, model, path = sys.argv[1:5]
    print(json.dumps(asyncio.run(main(http_url, grpc_address, model, np.load(path)))))
