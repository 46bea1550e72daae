"""Our inference.* protos against the ones tritonclient ships: same names, numbers and types.

Field numbers and types are what travel on the wire; a message or field we
declare must match Triton's exactly. Fields we leave out are fine (never sent).
Both sets load in one process because ours live in a private descriptor pool.
"""

from __future__ import annotations

import pytest
from google.protobuf.descriptor import Descriptor, EnumDescriptor, FileDescriptor
from resnet_serve_client.proto.inference import grpc_service_pb2, model_config_pb2
from tritonclient.grpc import model_config_pb2 as triton_config
from tritonclient.grpc import service_pb2 as triton_service

PAIRS = [
    (grpc_service_pb2.DESCRIPTOR, triton_service.DESCRIPTOR),
    (model_config_pb2.DESCRIPTOR, triton_config.DESCRIPTOR),
]


def _messages(file: FileDescriptor) -> dict[str, Descriptor]:
    found: dict[str, Descriptor] = {}

    def walk(message: Descriptor) -> None:
        found[message.full_name] = message
        for nested in message.nested_types:
            walk(nested)

    for message in file.message_types_by_name.values():
        walk(message)
    return found


def _enums(file: FileDescriptor) -> dict[str, EnumDescriptor]:
    enums = {e.full_name: e for e in file.enum_types_by_name.values()}
    for message in _messages(file).values():
        enums.update({e.full_name: e for e in message.enum_types})
    return enums


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=lambda f: f.name)
def test_every_message_matches_on_the_wire(ours: FileDescriptor, theirs: FileDescriptor) -> None:
    assert ours.package == theirs.package == "inference"
    reference = _messages(theirs)
    for name, message in _messages(ours).items():
        assert name in reference, f"{name} is not in Triton's protos"
        fields = reference[name].fields_by_name
        for field in message.fields:
            assert field.name in fields, f"{name}.{field.name} is not in Triton's protos"
            expected = fields[field.name]
            assert field.number == expected.number, f"{name}.{field.name}"
            assert field.type == expected.type, f"{name}.{field.name}"
            assert field.is_repeated == expected.is_repeated, f"{name}.{field.name}"
            kind = field.message_type or field.enum_type
            expected_kind = expected.message_type or expected.enum_type
            assert (kind and kind.full_name) == (expected_kind and expected_kind.full_name)
            oneof = field.containing_oneof and field.containing_oneof.name
            assert oneof == (expected.containing_oneof and expected.containing_oneof.name)


@pytest.mark.parametrize(("ours", "theirs"), PAIRS, ids=lambda f: f.name)
def test_every_enum_matches(ours: FileDescriptor, theirs: FileDescriptor) -> None:
    reference = _enums(theirs)
    for name, enum in _enums(ours).items():
        expected = {v.name: v.number for v in reference[name].values}
        assert {v.name: v.number for v in enum.values} == expected, name


def test_service_declares_every_triton_rpc() -> None:
    ours = grpc_service_pb2.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    theirs = triton_service.DESCRIPTOR.services_by_name["GRPCInferenceService"]
    assert ours.full_name == "inference.GRPCInferenceService"
    assert [m.name for m in ours.methods] == [m.name for m in theirs.methods]
    for method in ours.methods:
        expected = theirs.methods_by_name[method.name]
        assert method.input_type.full_name == expected.input_type.full_name
        assert method.output_type.full_name == expected.output_type.full_name
        assert method.client_streaming == expected.client_streaming
        assert method.server_streaming == expected.server_streaming


def test_messages_round_trip_between_the_two() -> None:
    request = grpc_service_pb2.ModelInferRequest(model_name="resnet18", id="7")
    tensor = request.inputs.add(name="images", datatype="FP32", shape=[1, 3, 224, 224])
    tensor.parameters["binary_data_size"].int64_param = 4
    request.outputs.add(name="logits").parameters["classification"].int64_param = 5
    request.raw_input_contents.append(b"\x00\x00\x80\x3f")
    theirs = triton_service.ModelInferRequest.FromString(request.SerializeToString())
    assert theirs.outputs[0].parameters["classification"].int64_param == 5
    assert list(theirs.inputs[0].shape) == [1, 3, 224, 224]
    assert theirs.raw_input_contents[0] == b"\x00\x00\x80\x3f"
