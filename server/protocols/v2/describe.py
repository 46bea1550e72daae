"""Server and model descriptions in v2 terms: ServerMetadata, ModelMetadata, ModelConfig.

The model configuration is what Triton would report for the same ONNX model
with a ``config.pbtxt``: shapes without the batch dimension (``max_batch_size``
> 0), the input's layout in ``format`` (image clients read it to choose CHW or
HWC), the labels file on the output, dynamic batching and instance groups (one per
execution provider the instances really run on).
"""

from __future__ import annotations

import itertools
from importlib.metadata import version

from resnet_serve_client.proto.inference import grpc_service_pb2 as pb
from resnet_serve_client.proto.inference import model_config_pb2 as mc

from server.core.registry import Model, ModelRegistry, ModelVersion, State, by_version
from server.providers import GPU_PROVIDERS
from server.repository import MODEL_FILE, ModelConfig
from server.validation import input_datatype

SERVER_NAME = "resnet-serve"
# Protocol extensions, as Triton names them, that this server implements; with a model
# control mode other than none, MODEL_REPOSITORY too (load and unload); unless
# shared_memory_regions is 0, SYSTEM_SHARED_MEMORY.
EXTENSIONS = ("classification", "model_configuration", "statistics", "logging")
MODEL_REPOSITORY = "model_repository"
SYSTEM_SHARED_MEMORY = "system_shared_memory"
BACKEND = "onnxruntime"
_CONFIG_TYPES = {"FP32": mc.TYPE_FP32, "UINT8": mc.TYPE_UINT8}
_FORMATS = {"NCHW": mc.ModelInput.FORMAT_NCHW, "NHWC": mc.ModelInput.FORMAT_NHWC}


def extensions(model_control_mode: str, shared_memory: bool = True) -> tuple[str, ...]:
    found = (*EXTENSIONS, MODEL_REPOSITORY) if model_control_mode != "none" else EXTENSIONS
    return (*found, SYSTEM_SHARED_MEMORY) if shared_memory else found


def server_metadata(
    model_control_mode: str, shared_memory: bool = True
) -> pb.ServerMetadataResponse:
    return pb.ServerMetadataResponse(
        name=SERVER_NAME,
        version=version("resnet-serve"),
        extensions=extensions(model_control_mode, shared_memory),
    )


def ready_versions(model: Model) -> list[str]:
    return [v.version for v in by_version(model.versions.values()) if v.state is State.READY]


def model_metadata(model: Model, served: ModelVersion) -> pb.ModelMetadataResponse:
    config = served.config
    tensor = pb.ModelMetadataResponse.TensorMetadata
    return pb.ModelMetadataResponse(
        name=model.name,
        versions=ready_versions(model),
        platform=config.platform,
        inputs=[
            tensor(
                name=config.input.name, datatype=input_datatype(config), shape=config.input.shape()
            )
        ],
        outputs=[tensor(name=config.output.name, datatype="FP32", shape=[-1, config.num_classes])],
    )


def repository_index(registry: ModelRegistry, ready_only: bool) -> pb.RepositoryIndexResponse:
    """Every version of every model and its state (only the READY ones if ``ready_only``)."""
    entry = pb.RepositoryIndexResponse.ModelIndex
    return pb.RepositoryIndexResponse(
        models=[
            entry(name=m.name, version=v.version, state=v.state.value, reason=v.reason)
            for m in registry.models()
            for v in by_version(m.versions.values())
            if v.state is State.READY or not ready_only
        ]
    )


def instance_groups(served: ModelVersion, cuda_device: int) -> list[mc.ModelInstanceGroup]:
    """Triton's instance groups for ``served``: one per execution provider its instances
    really run on (KIND_GPU with the device for CUDA and TensorRT, KIND_CPU), in order."""
    group = mc.ModelInstanceGroup
    groups: list[mc.ModelInstanceGroup] = []
    for provider, run in itertools.groupby(served.providers):
        on_gpu = provider in GPU_PROVIDERS
        groups.append(
            group(
                name=f"{served.name}_{len(groups)}",
                count=len(list(run)),
                kind=group.KIND_GPU if on_gpu else group.KIND_CPU,
                gpus=[cuda_device] if on_gpu else [],
            )
        )
    return groups


def config_response(served: ModelVersion, cuda_device: int) -> pb.ModelConfigResponse:
    """The ModelConfig RPC's answer for ``served``; ``cuda_device``: the GPU its instances
    use when they run on one."""
    config: ModelConfig = served.config
    batching = config.batching
    return pb.ModelConfigResponse(
        config=mc.ModelConfig(
            name=served.name,
            platform=config.platform,
            backend=BACKEND,
            max_batch_size=batching.max_batch_size,
            input=[
                mc.ModelInput(
                    name=config.input.name,
                    data_type=_CONFIG_TYPES[input_datatype(config)],
                    format=_FORMATS[config.input.layout],
                    dims=config.input.shape()[1:],
                )
            ],
            output=[
                mc.ModelOutput(
                    name=config.output.name,
                    data_type=mc.TYPE_FP32,
                    dims=[config.num_classes],
                    label_filename=config.labels,
                )
            ],
            instance_group=instance_groups(served, cuda_device),
            default_model_filename=MODEL_FILE,
            # where the weights came from ("random (seed N)": an untrained model)
            parameters=(
                {"weights": mc.ModelParameter(string_value=served.weights)}
                if served.weights
                else {}
            ),
            dynamic_batching=mc.ModelDynamicBatching(
                preferred_batch_size=batching.preferred_batch_sizes,
                max_queue_delay_microseconds=batching.max_queue_delay_us,
                # Triton counts requests here; this server counts images.
                default_queue_policy=mc.ModelQueuePolicy(max_queue_size=batching.max_queue_size),
            ),
        )
    )
