"""The catalogue of bad (and merely odd) inputs: one row per case, both APIs.

Each `Case` names the request (built when the test runs), the exact status
code and a fragment the message must contain. Odd but valid images expect
OK, and where their answer must equal another image's (EXIF orientation,
16-bit depth, the first GIF frame) ``same_as`` builds that request.

Image cases run through both ``Classify`` and v2 ``ModelInfer`` (a BYTES
element); tensor and request-level cases are written for each API's own
fields. The server runs with the limits below (`SERVER_FLAGS`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import grpc
import numpy as np
from resnet_serve_client import bytes_tensor
from resnet_serve_client.proto.resnet_serve.v1 import classifier_pb2 as pb

from tests.reliability import images
from tests.reliability.wire import (
    Request,
    classification,
    classify,
    float_image,
    infer,
    infer_floats,
    infer_images,
    output,
    uint8_image,
    v2,
)

MODEL = "cifar"  # 10 classes, float32 [3, 32, 32]: cheap to run for every case
UINT8_MODEL = "resnet18_u8"
MAX_MESSAGE_BYTES = 4_000_000
MAX_IMAGE_BYTES = 1_000_000
MAX_IMAGE_PIXELS = 40_000_000  # the default
MAX_IMAGES = 64  # the default
SERVER_FLAGS = ("--max-message-bytes", str(MAX_MESSAGE_BYTES),
                "--max-image-bytes", str(MAX_IMAGE_BYTES), "--reject-non-finite")  # fmt: skip
NON_FINITE = "input holds NaN or Inf values; this server takes only finite values"

OK = grpc.StatusCode.OK
INVALID = grpc.StatusCode.INVALID_ARGUMENT
NOT_FOUND = grpc.StatusCode.NOT_FOUND
EXHAUSTED = grpc.StatusCode.RESOURCE_EXHAUSTED


@dataclass(frozen=True)
class Case:
    name: str
    api: str  # "classify" or "v2"
    request: Callable[[], Request]
    code: grpc.StatusCode
    fragment: str = ""
    same_as: Callable[[], Request] | None = None

    @property
    def id(self) -> str:
        return f"{self.api}:{self.name}"


@dataclass(frozen=True)
class ImageCase:
    """An encoded image sent alone; ``image`` returns it, or with ``reference`` the pair
    (it, an image whose answer it must equal)."""

    name: str
    image: Callable[[], bytes | tuple[bytes, bytes]]
    code: grpc.StatusCode
    fragment: str = ""
    reference: bool = False


IMAGE_CASES = [
    ImageCase("empty-bytes", lambda: b"", INVALID, "image 0: image is empty"),
    ImageCase("truncated-jpeg", images.truncated_jpeg, INVALID,
              "image 0: image data is truncated or corrupt"),
    ImageCase("random-bytes", lambda: images.random_bytes(4096), INVALID,
              "image 0: image bytes are not a decodable image; allowed formats: JPEG, PNG"),
    ImageCase("png-decompression-bomb", images.png_bomb, INVALID,
              f"image has too many pixels; at most {MAX_IMAGE_PIXELS} are allowed"),
    ImageCase("png-9000x9000-header", lambda: images.png_bomb(9000), INVALID,
              f"9000x9000 = 81000000 pixels; at most {MAX_IMAGE_PIXELS} are allowed"),
    ImageCase("jpeg-20000x20000", lambda: images.jpeg_claiming(20000, 20000), INVALID,
              f"image has too many pixels; at most {MAX_IMAGE_PIXELS} are allowed"),
    ImageCase("unsupported-tiff", images.tiff, INVALID,
              "unsupported image format TIFF; allowed: JPEG, PNG, WebP, BMP or GIF"),
    ImageCase("over-the-byte-limit", lambda: images.random_bytes(MAX_IMAGE_BYTES + 1), INVALID,
              f"image has {MAX_IMAGE_BYTES + 1} bytes; at most {MAX_IMAGE_BYTES} are allowed"),
    ImageCase("1x1", images.one_pixel, OK),
    ImageCase("animated-gif-first-frame", images.animated_gif, OK, reference=True),
    ImageCase("cmyk-jpeg", images.cmyk_jpeg, OK),
    ImageCase("16-bit-png", images.sixteen_bit_png, OK, reference=True),
    ImageCase("grayscale", images.grayscale_png, OK),
    ImageCase("palette", images.palette_png, OK),
    ImageCase("rgba", images.rgba_png, OK),
    ImageCase("exif-rotated", images.exif_rotated, OK, reference=True),
]  # fmt: skip


def _image_rows(case: ImageCase) -> list[Case]:
    def image() -> bytes:
        made = case.image()
        return made if isinstance(made, bytes) else made[0]

    def reference() -> bytes:
        made = case.image()
        assert isinstance(made, tuple)
        return made[1]

    has_reference = case.reference
    return [
        Case(case.name, "classify", lambda: classify(MODEL, image()), case.code, case.fragment,
             (lambda: classify(MODEL, reference())) if has_reference else None),
        Case(case.name, "v2", lambda: infer_images(MODEL, image()), case.code, case.fragment,
             (lambda: infer_images(MODEL, reference())) if has_reference else None),
    ]  # fmt: skip


def _filled(value: float) -> np.ndarray:
    return np.full((3, 32, 32), value, np.float32)


def _bad_prefix() -> bytes:
    return b"\x03\x00\x00\x00ab"  # declares 3 bytes, carries 2


# Many elements in a message under the limit: 250000 empty BYTES elements are 1 MB raw.
# Splitting them all took seconds of the event loop (every other call waited); each is
# refused from what the request declares, or at the first element past its shape.
MANY = 250_000


def _many_empty() -> bytes:
    return bytes_tensor.serialize([b""] * MANY)


def typed(model: str, datatype: str, shape: list[int], field: str, values: list) -> Request:
    """A v2 request whose input travels in typed ``contents`` (``field``)."""
    request = v2.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="images", datatype=datatype, shape=shape)
    getattr(tensor.contents, field).extend(values)
    return request


def _many_inputs(count: int) -> Request:
    """A v2 request naming `count` inputs the model does not have."""
    request = v2.ModelInferRequest(model_name=MODEL)
    for i in range(count):
        request.inputs.add(name=f"x{i}", datatype="FP32", shape=[1])
        request.raw_input_contents.append(bytes(4))
    return request


def _with_id(request: Request, request_id: str) -> Request:
    """`request` with the caller's request id (``request_id`` in v1, ``id`` in v2)."""
    setattr(request, "request_id" if isinstance(request, pb.ClassifyRequest) else "id",
            request_id)  # fmt: skip
    return request


MAX_REQUEST_ID = 128
REQUEST_ID_REFUSED = "characters is not allowed: send 1 to 128 visible ASCII characters"
# (name, id, code, fragment): the same for both APIs
REQUEST_ID_CASES = [
    ("request-id-too-long", "x" * (MAX_REQUEST_ID + 1), INVALID,
     f"request id of {MAX_REQUEST_ID + 1} {REQUEST_ID_REFUSED}"),
    ("request-id-newline", "abc\n2026-01-01 INFO forged line", INVALID,
     f"request id of 31 {REQUEST_ID_REFUSED}"),
    ("request-id-escape-sequence", "\x1b[31mred", INVALID, REQUEST_ID_REFUSED),
    ("request-id-space", "a b", INVALID, REQUEST_ID_REFUSED),
    ("request-id-non-ascii", "café", INVALID, REQUEST_ID_REFUSED),
    ("request-id-at-the-limit", "a-Z_0.9:/" + "x" * (MAX_REQUEST_ID - 9), OK, ""),
]  # fmt: skip


def _request_id_rows() -> list[Case]:
    return [
        Case(name, api, lambda api=api, rid=rid: _with_id(
            classify(MODEL, images.one_pixel()) if api == "classify"
            else infer_images(MODEL, images.one_pixel()), rid), code, fragment)
        for name, rid, code, fragment in REQUEST_ID_CASES
        for api in ("classify", "v2")
    ]  # fmt: skip


CLASSIFY_CASES = [
    Case("second-image-undecodable", "classify",
         lambda: classify(MODEL, images.one_pixel(), b"no image"), INVALID,
         "image 1: image bytes are not a decodable image"),
    Case("image-without-data", "classify", lambda: classify(MODEL, pb.Image()), INVALID,
         "image 0: has no data; set encoded (image bytes) or tensor"),
    Case("uint8-tensor-rank", "classify", lambda: classify(MODEL, uint8_image([8, 8])), INVALID,
         "uint8 tensor shape is [8, 8]; expected [height, width, 3]"),
    Case("uint8-tensor-over-pixel-limit", "classify",
         lambda: classify(MODEL, uint8_image([20000, 20000, 3], b"")), INVALID,
         f"uint8 tensor has 400000000 pixels; at most {MAX_IMAGE_PIXELS} allowed"),
    Case("tensor-byte-length", "classify",
         lambda: classify(MODEL, uint8_image([10, 10, 3], bytes(299))), INVALID,
         "tensor data has 299 bytes; shape [10, 10, 3] of uint8 needs 300"),
    Case("tensor-dtype-unset", "classify",
         lambda: classify(MODEL, pb.Image(tensor=pb.Tensor(shape=[10, 10, 3], data=bytes(300)))),
         INVALID, "tensor dtype is unset; use UINT8 (HWC) or FLOAT32 (CHW)"),
    Case("float-tensor-shape", "classify",
         lambda: classify(MODEL, float_image(np.zeros((3, 224, 224), np.float32))), INVALID,
         f"float32 tensor shape is [3, 224, 224]; model {MODEL} takes [3, 32, 32] (CHW)"),
    Case("float-tensor-for-uint8-model", "classify",
         lambda: classify(UINT8_MODEL, float_image(np.zeros((3, 224, 224), np.float32))),
         INVALID, f"model {UINT8_MODEL} takes uint8 pixels"),
    Case("float-tensor-nan", "classify", lambda: classify(MODEL, float_image(_filled(np.nan))),
         INVALID, NON_FINITE),
    Case("float-tensor-inf", "classify", lambda: classify(MODEL, float_image(_filled(np.inf))),
         INVALID, NON_FINITE),
    Case("top-k-zero", "classify", lambda: classify(MODEL, images.one_pixel(), top_k=0),
         INVALID, "top_k is 0; allowed: 1 to 10 (model cifar)"),
    Case("top-k-negative", "classify", lambda: classify(MODEL, images.one_pixel(), top_k=-3),
         INVALID, "top_k is -3; allowed: 1 to 10 (model cifar)"),
    Case("top-k-over-classes", "classify", lambda: classify(MODEL, images.one_pixel(), top_k=11),
         INVALID, "top_k is 11; allowed: 1 to 10 (model cifar)"),
    Case("unknown-model", "classify", lambda: classify("resnet50", images.one_pixel()),
         NOT_FOUND, "unknown model 'resnet50'; models: cifar, resnet18_u8"),
    Case("unknown-version", "classify",
         lambda: classify(MODEL, images.one_pixel(), version="2"), NOT_FOUND,
         "model 'cifar' has no version '2'; versions: 1"),
    Case("no-model-name", "classify", lambda: classify("", images.one_pixel()), INVALID,
         "model is empty; ListModels shows the models"),
    Case("empty-request", "classify", lambda: classify(MODEL), INVALID,
         f"request has no images; send 1 to {MAX_IMAGES}"),
    Case("too-many-images", "classify",
         lambda: classify(MODEL, *[images.one_pixel()] * (MAX_IMAGES + 1)), INVALID,
         f"request has {MAX_IMAGES + 1} images; at most {MAX_IMAGES} are allowed"),
    # (protobuf unpacks each empty Image into an object of its own before the server sees
    # the request: a count far smaller than MANY, which would cost ~60 MB of RSS alone)
    Case("many-empty-images", "classify", lambda: classify(MODEL, *[pb.Image()] * 20_000),
         INVALID, f"request has 20000 images; at most {MAX_IMAGES} are allowed"),
    Case("over-the-message-limit", "classify",
         lambda: classify(MODEL, images.random_bytes(MAX_MESSAGE_BYTES + 1000)), EXHAUSTED,
         f"vs. {MAX_MESSAGE_BYTES})"),
]  # fmt: skip

V2_CASES = [
    Case("second-image-undecodable", "v2",
         lambda: infer_images(MODEL, images.one_pixel(), b"no image"), INVALID,
         "image 1: image bytes are not a decodable image"),
    Case("fp32-shape", "v2", lambda: infer_floats(MODEL, np.zeros((1, 3, 224, 224))), INVALID,
         f"model {MODEL} takes input of shape [-1, 3, 32, 32] (NCHW, batch >= 1), "
         "got [1, 3, 224, 224]"),
    Case("wrong-datatype", "v2",
         lambda: infer(MODEL, datatype="INT32", shape=[1, 3, 32, 32], raw=bytes(4 * 3072)),
         INVALID, "input 'images' is INT32; model 'cifar' takes 'images' as FP32"),
    Case("unknown-datatype", "v2",
         lambda: infer(MODEL, datatype="FP8", shape=[1, 3, 32, 32], raw=bytes(3072)), INVALID,
         "unknown datatype 'FP8'; the protocol's datatypes are BOOL, UINT8"),
    Case("raw-byte-length", "v2",
         lambda: infer(MODEL, datatype="FP32", shape=[1, 3, 32, 32], raw=bytes(100)), INVALID,
         "needs 12288 bytes of raw contents, got 100"),
    Case("40000-inputs", "v2", lambda: _many_inputs(40_000), INVALID,
         "... (cut; "),
    Case("negative-dimension", "v2",
         lambda: infer(MODEL, datatype="FP32", shape=[-1, 3, 32, 32], raw=b""), INVALID,
         "has shape [-1, 3, 32, 32]; dimensions must be >= 0"),
    Case("zero-dimension-beside-huge-ones", "v2",  # found by test_properties.py
         lambda: infer(MODEL, datatype="BOOL", shape=[0, 2030, 67401218, 67410251], raw=b""),
         INVALID, "its non-zero dimensions may multiply to at most 1099511627776"),
    Case("fp32-nan", "v2", lambda: infer_floats(MODEL, _filled(np.nan)[None]), INVALID,
         NON_FINITE),
    Case("fp32-inf", "v2", lambda: infer_floats(MODEL, -_filled(np.inf)[None]), INVALID,
         NON_FINITE),
    Case("bytes-length-prefix-past-the-end", "v2",
         lambda: infer(MODEL, datatype="BYTES", shape=[1], raw=_bad_prefix()), INVALID,
         "BYTES element 0 declares 3 bytes but only 2 remain"),
    Case("bytes-truncated-length-prefix", "v2",
         lambda: infer(MODEL, datatype="BYTES", shape=[1], raw=b"\x01\x00"), INVALID,
         "only 2 bytes remain for its 4-byte length prefix"),
    Case("bytes-count-vs-shape", "v2",
         lambda: infer(MODEL, datatype="BYTES", shape=[2], raw=_bad_prefix()[:4] + b"abc"),
         INVALID, "has shape [2] (2 elements) but its raw contents hold 1 BYTES elements"),
    Case("bytes-shape-not-a-list", "v2",
         lambda: infer(MODEL, datatype="BYTES", shape=[1, 1, 1], raw=_bad_prefix()[:4] + b"abc"),
         INVALID, "encoded images go in shape [N] or [N, 1] with N >= 1"),
    Case("unknown-model", "v2", lambda: infer_images("resnet50", images.one_pixel()),
         NOT_FOUND, "unknown model 'resnet50'; models: cifar, resnet18_u8"),
    Case("unknown-version", "v2",
         lambda: infer_images(MODEL, images.one_pixel(), version="2"), NOT_FOUND,
         "model 'cifar' has no version '2'; versions: 1"),
    Case("empty-request", "v2", lambda: v2.ModelInferRequest(model_name=MODEL), INVALID,
         "model 'cifar' takes exactly one input, 'images' as FP32 [-1, 3, 32, 32]"),
    Case("unknown-input", "v2",
         lambda: infer_images(MODEL, images.one_pixel(), name="pixels"), INVALID,
         "unknown input 'pixels'; model 'cifar' takes 'images'"),
    Case("unknown-output", "v2",
         lambda: infer_images(MODEL, images.one_pixel(), outputs=[output("probabilities")]),
         INVALID,
         "unknown output 'probabilities'; model 'cifar' has one output 'logits'"),
    Case("classification-zero", "v2",
         lambda: infer_images(MODEL, images.one_pixel(), outputs=[classification(0)]), INVALID,
         "parameter 'classification' must be >= 1, got 0"),
    Case("classification-negative", "v2",
         lambda: infer_images(MODEL, images.one_pixel(), outputs=[classification(-3)]),
         INVALID, "parameter 'classification' must be >= 1, got -3"),
    # Triton's rule: a classification count above the classes returns every class.
    Case("classification-over-classes", "v2",
         lambda: infer_images(MODEL, images.one_pixel(), outputs=[classification(11)]), OK),
    Case("too-many-images", "v2",
         lambda: infer_images(MODEL, *[images.one_pixel()] * (MAX_IMAGES + 1)), INVALID,
         f"request has {MAX_IMAGES + 1} images; at most {MAX_IMAGES} are allowed"),
    Case("bytes-many-empty-elements", "v2",
         lambda: infer(MODEL, datatype="BYTES", shape=[MANY], raw=_many_empty()), INVALID,
         f"request has {MANY} images; at most {MAX_IMAGES} are allowed"),
    Case("bytes-elements-past-the-shape", "v2",
         lambda: infer(MODEL, datatype="BYTES", shape=[1], raw=_many_empty()), INVALID,
         "has shape [1] (1 elements) but its raw contents hold more than 1 BYTES elements"),
    Case("bytes-count-in-the-second-dimension", "v2",
         lambda: infer(MODEL, datatype="BYTES", shape=[1, MANY], raw=_many_empty()), INVALID,
         f"has shape [1, {MANY}]; encoded images go in shape [N] or [N, 1]"),
    Case("typed-bytes-many-empty-elements", "v2",
         lambda: typed(MODEL, "BYTES", [MANY], "bytes_contents", [b""] * MANY), INVALID,
         f"request has {MANY} images; at most {MAX_IMAGES} are allowed"),
    Case("typed-fp32-count-vs-shape", "v2",
         lambda: typed(MODEL, "FP32", [1, 3, 32, 32], "fp32_contents", [0.0] * MANY), INVALID,
         f"has shape [1, 3, 32, 32] (3072 elements) but 'fp32_contents' holds {MANY}"),
    Case("fp32-shape-before-its-data", "v2",
         lambda: infer(MODEL, datatype="FP32", shape=[64, 3, 224, 224], raw=b""), INVALID,
         "takes input of shape [-1, 3, 32, 32] (NCHW, batch >= 1), got [64, 3, 224, 224]"),
    Case("typed-fp32-contents", "v2",
         lambda: typed(MODEL, "FP32", [1, 3, 32, 32], "fp32_contents", [0.5] * 3072), OK),
    Case("typed-uint8-out-of-range", "v2",
         lambda: typed(UINT8_MODEL, "UINT8", [1, 224, 224, 3], "uint_contents",
                       [256] * (224 * 224 * 3)), INVALID,
         "input 'images' has values outside the range of UINT8"),
    Case("over-the-message-limit", "v2",
         lambda: infer_images(MODEL, images.random_bytes(MAX_MESSAGE_BYTES + 1000)), EXHAUSTED,
         f"vs. {MAX_MESSAGE_BYTES})"),
]  # fmt: skip

CASES: list[Case] = [
    *(row for case in IMAGE_CASES for row in _image_rows(case)),
    *CLASSIFY_CASES,
    *V2_CASES,
    *_request_id_rows(),
]


def valid_requests() -> list[Request]:
    """What must still succeed after every case, on both APIs."""
    photo = images.jpeg(images.photo())
    return [classify(MODEL, photo), infer_images(MODEL, photo)]
