"""The descriptor pool server reflection answers from: every served service's files.

The v2 messages live in a private pool (see protos/generate.py: tritonclient
claims the same ``inference.*`` names in protobuf's default pool), so the
default pool alone would leave ``inference.GRPCInferenceService`` listed but
not describable by grpcurl and other reflection clients. This pool holds the
files of each service, with their dependencies, from whichever pool has them.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf import descriptor_pb2, descriptor_pool
from google.protobuf.descriptor import FileDescriptor
from resnet_serve_client.proto.inference import _pool as inference_pool


def for_services(names: Iterable[str]) -> descriptor_pool.DescriptorPool:
    pool = descriptor_pool.DescriptorPool()
    added: set[str] = set()

    def add(file: FileDescriptor) -> None:
        if file.name in added:
            return
        for dependency in file.dependencies:
            add(dependency)
        proto = descriptor_pb2.FileDescriptorProto()
        file.CopyToProto(proto)
        pool.AddSerializedFile(proto.SerializeToString())
        added.add(file.name)

    for name in names:
        add(_source(name).FindFileContainingSymbol(name))
    return pool


def _source(name: str) -> descriptor_pool.DescriptorPool:
    private: descriptor_pool.DescriptorPool = inference_pool.POOL
    try:
        private.FindServiceByName(name)
    except KeyError:
        return descriptor_pool.Default()
    return private
