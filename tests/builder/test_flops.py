"""Multiply-adds counted from a graph, checked on a graph small enough to count by hand."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from builder.architectures import Layout
from builder.checks import check_macs
from builder.flops import count_macs
from builder.registry import REGISTRY


def tiny_graph() -> onnx.ModelProto:
    """images [N,8,10,10] → grouped 3×3 conv (16 out, 4 groups, stride 2) → flatten → Gemm 5
    → MatMul to 3."""
    weights = {
        "w_conv": np.zeros((16, 2, 3, 3), np.float32),
        "w_gemm": np.zeros((5, 16 * 5 * 5), np.float32),
        "b_gemm": np.zeros((5,), np.float32),
        "w_mm": np.zeros((5, 3), np.float32),
    }
    nodes = [
        helper.make_node(
            "Conv", ["images", "w_conv"], ["c"], group=4, strides=[2, 2], pads=[1, 1, 1, 1]
        ),
        helper.make_node("Flatten", ["c"], ["f"]),
        helper.make_node("Gemm", ["f", "w_gemm", "b_gemm"], ["g"], transB=1),
        helper.make_node("MatMul", ["g", "w_mm"], ["logits"]),
    ]
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", 8, 10, 10])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [numpy_helper.from_array(v, k) for k, v in weights.items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_counts_conv_gemm_and_matmul_per_image() -> None:
    count = count_macs(tiny_graph())
    conv = (16 * 5 * 5) * (2 * 3 * 3)  # output elements × (C_in / groups) × k × k
    gemm = 5 * 400
    matmul = 3 * 5
    assert count.by_op == {"Conv": conv, "Gemm": gemm, "MatMul": matmul}
    assert count.total == conv + gemm + matmul


def test_unknown_spatial_size_is_refused() -> None:
    model = tiny_graph()
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "height", "width"
    with pytest.raises(ValueError, match="unknown dimensions"):
        count_macs(model)
    check = check_macs(model, REGISTRY.get("resnet18"), Layout.TORCHVISION, 1000, 0.03)
    assert not check.passed
    assert check.detail.startswith("cannot count: shape inference left c with unknown dimensions")


def test_a_layout_without_a_published_figure_is_reported_not_failed() -> None:
    check = check_macs(tiny_graph(), REGISTRY.get("resnext50_32x4d"), Layout.ORIGINAL, 1000, 0.03)
    assert check.passed
    assert check.figures["reference"] is None
    assert "no published figure for the original layout" in check.detail


def test_a_count_far_from_the_paper_fails_with_the_figures() -> None:
    check = check_macs(tiny_graph(), REGISTRY.get("resnet18"), Layout.TORCHVISION, 1000, 0.03)
    assert not check.passed
    assert check.figures["counted"] == 9215
    assert "vs 1.800 G (-100.0%, outside ±3%)" in check.detail
