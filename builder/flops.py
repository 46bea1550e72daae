"""Multiply-adds per image, counted from an ONNX graph's Conv, Gemm and MatMul nodes.

Output shapes come from ONNX shape inference; the batch axis is left out, so the figure
is per image. A convolution costs ``output elements × (C_in / groups) × k_h × k_w``, a
matrix product ``output elements × K``. Element-wise ops, pooling and BatchNorm (folded
into the convolutions by export) are not counted, as in the papers' tables.
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import onnx
from onnx import shape_inference


@dataclass(frozen=True)
class MacCount:
    total: int
    by_op: dict[str, int]


def _static_dims(type_proto: onnx.TypeProto) -> list[int | None]:
    return [
        d.dim_value if d.HasField("dim_value") else None for d in type_proto.tensor_type.shape.dim
    ]


def _shapes(model: onnx.ModelProto) -> dict[str, list[int | None]]:
    graph = model.graph
    shapes = {init.name: list(init.dims) for init in graph.initializer}
    for value in (*graph.input, *graph.value_info, *graph.output):
        shapes.setdefault(value.name, _static_dims(value.type))
    return shapes


def _known(dims: list[int | None], name: str) -> list[int]:
    if any(d is None for d in dims):
        raise ValueError(f"shape inference left {name} with unknown dimensions: {dims}")
    return [int(d) for d in dims if d is not None]


def count_macs(model: onnx.ModelProto) -> MacCount:
    """Raises ValueError when a counted node's shapes are not all known."""
    inferred = shape_inference.infer_shapes(model)
    shapes = _shapes(inferred)
    by_op: Counter[str] = Counter()
    for node in inferred.graph.node:
        if node.op_type not in ("Conv", "Gemm", "MatMul"):
            continue
        out, weight_name = node.output[0], node.input[1]
        if out not in shapes or weight_name not in shapes:
            raise ValueError(f"shape inference gave no shapes for {node.op_type} {node.name}")
        outputs = math.prod(_known(shapes[out][1:], out))  # per image: the batch axis left out
        weight = _known(shapes[weight_name], weight_name)
        if node.op_type == "Conv":
            per_output = math.prod(weight[1:])  # (C_in / groups) × k_h × k_w
        elif node.op_type == "Gemm":
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            per_output = weight[1] if trans_b else weight[0]
        else:
            per_output = weight[-2]
        by_op[node.op_type] += outputs * per_output
    return MacCount(total=sum(by_op.values()), by_op=dict(by_op))
