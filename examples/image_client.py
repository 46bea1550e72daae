"""An image-classification client written for Triton, as its own image_client example works.

It knows nothing about resnet-serve: it reads the model's metadata and
configuration to find the input's name, layout (format), datatype and size,
scales pixels itself, sends FP32/UINT8 batches over gRPC (sync, async or
streaming) and asks for the top classes through the classification extension.
Run against Triton's ResNet-50 ONNX example, or against this server with only
the model name changed:

    python examples/image_client.py -m resnet50 -c 3 -s INCEPTION -u localhost:8001 cat.jpg
"""

from __future__ import annotations

import argparse
import queue
import sys
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.model_config_pb2 as mc
from PIL import Image
from tritonclient.utils import InferenceServerException, triton_to_np_dtype

Callback = tuple[Any, InferenceServerException | None]


def parse_model(metadata: Any, config: Any) -> tuple[int, str, str, int, int, int, int, str]:
    """Check the model is an image classifier and return what preprocessing needs."""
    if len(metadata.inputs) != 1 or len(config.input) != 1:
        raise Exception(f"expecting 1 input, got {len(metadata.inputs)}")
    if len(metadata.outputs) != 1:
        raise Exception(f"expecting 1 output, got {len(metadata.outputs)}")
    input_metadata, input_config = metadata.inputs[0], config.input[0]
    output_metadata = metadata.outputs[0]
    if output_metadata.datatype != "FP32":
        raise Exception(f"expecting an FP32 output, got {output_metadata.datatype}")

    batching = config.max_batch_size > 0
    dims = list(output_metadata.shape)[1 if batching else 0 :]
    if sum(d > 1 for d in dims) > 1:
        raise Exception("expecting the model output to be a vector")
    if len(input_metadata.shape) != 3 + batching:
        raise Exception(f"expecting a {3 + batching}-D input, got {list(input_metadata.shape)}")
    if input_config.format not in (mc.ModelInput.FORMAT_NCHW, mc.ModelInput.FORMAT_NHWC):
        raise Exception(f"unexpected input format {mc.ModelInput.Format.Name(input_config.format)}")

    shape = list(input_metadata.shape)[1 if batching else 0 :]
    if input_config.format == mc.ModelInput.FORMAT_NHWC:
        h, w, c = shape
    else:
        c, h, w = shape
    return (
        config.max_batch_size,
        input_metadata.name,
        output_metadata.name,
        c,
        h,
        w,
        input_config.format,
        input_metadata.datatype,
    )


def preprocess(
    image: Image.Image, layout: int, datatype: str, c: int, h: int, w: int, scaling: str
) -> np.ndarray:
    sample = image.convert("L" if c == 1 else "RGB").resize((w, h), Image.BILINEAR)
    pixels = np.array(sample)
    if pixels.ndim == 2:
        pixels = pixels[:, :, np.newaxis]
    dtype = triton_to_np_dtype(datatype)
    typed = pixels.astype(dtype)
    if scaling == "INCEPTION":
        scaled = (typed / 127.5) - 1
    elif scaling == "VGG":
        scaled = typed - np.asarray((128,) if c == 1 else (123, 117, 104), dtype=dtype)
    else:
        scaled = typed
    scaled = scaled.astype(dtype)
    return np.transpose(scaled, (2, 0, 1)) if layout == mc.ModelInput.FORMAT_NCHW else scaled


def postprocess(
    result: grpcclient.InferResult, output_name: str, batch_size: int, batching: bool
) -> None:
    classes = result.as_numpy(output_name)
    if batching and len(classes) != batch_size:
        raise Exception(f"expected {batch_size} results, got {len(classes)}")
    for row in classes:
        for entry in row if batching else [row]:
            text = "".join(chr(x) for x in entry) if classes.dtype.type == np.object_ else entry
            value, index, label = text.split(":", 2)
            print(f"    {value} ({index}) = {label}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-a", "--async", dest="async_set", action="store_true")
    parser.add_argument("--streaming", action="store_true")
    parser.add_argument("-m", "--model-name", required=True)
    parser.add_argument("-x", "--model-version", default="")
    parser.add_argument("-b", "--batch-size", type=int, default=1)
    parser.add_argument("-c", "--classes", type=int, default=1)
    parser.add_argument("-s", "--scaling", choices=["NONE", "INCEPTION", "VGG"], default="NONE")
    parser.add_argument("-u", "--url", default="localhost:8001")
    parser.add_argument("-i", "--protocol", default="gRPC", choices=["gRPC", "grpc"])
    parser.add_argument("image_filename")
    flags = parser.parse_args(argv)

    client = grpcclient.InferenceServerClient(url=flags.url)
    try:
        metadata = client.get_model_metadata(flags.model_name, flags.model_version)
        config = client.get_model_config(flags.model_name, flags.model_version).config
    except InferenceServerException as exc:
        print(f"failed to retrieve the metadata or config: {exc}")
        return 1
    max_batch_size, input_name, output_name, c, h, w, layout, datatype = parse_model(
        metadata, config
    )
    batching = max_batch_size > 0
    if not batching and flags.batch_size != 1:
        print("ERROR: This model doesn't support batching.")
        return 1

    path = Path(flags.image_filename)
    filenames = sorted(p for p in path.iterdir() if p.is_file()) if path.is_dir() else [path]
    images = [
        preprocess(Image.open(f), layout, datatype, c, h, w, flags.scaling) for f in filenames
    ]

    completed: queue.Queue[Callback] = queue.Queue()
    if flags.streaming:
        client.start_stream(partial(lambda q, result, error: q.put((result, error)), completed))

    sent, index, last = 0, 0, False
    results: list[grpcclient.InferResult] = []
    while not last:
        chosen = []
        for _ in range(flags.batch_size):
            chosen.append(images[index])
            index = (index + 1) % len(images)
            last = last or index == 0
        batch = np.stack(chosen) if batching else chosen[0]
        inputs = [grpcclient.InferInput(input_name, list(batch.shape), datatype)]
        inputs[0].set_data_from_numpy(batch)
        outputs = [grpcclient.InferRequestedOutput(output_name, class_count=flags.classes)]
        sent += 1
        common: dict[str, Any] = {
            "request_id": str(sent), "model_version": flags.model_version, "outputs": outputs,
        }  # fmt: skip
        if flags.streaming:
            client.async_stream_infer(flags.model_name, inputs, **common)
        elif flags.async_set:
            client.async_infer(
                flags.model_name,
                inputs,
                partial(lambda q, result, error: q.put((result, error)), completed),
                **common,
            )
        else:
            results.append(client.infer(flags.model_name, inputs, **common))

    if flags.streaming or flags.async_set:
        for _ in range(sent):
            result, error = completed.get(timeout=300)
            if error is not None:
                print(f"inference failed: {error}")
                return 1
            results.append(result)
    if flags.streaming:
        client.stop_stream()

    for result in sorted(results, key=lambda r: int(r.get_response().id)):
        print(f"Request {result.get_response().id}, batch size {flags.batch_size}")
        postprocess(result, output_name, flags.batch_size, batching)
    print("PASS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
