"""The Open Inference Protocol v2 over gRPC (``inference.GRPCInferenceService``).

`servicer` answers the RPCs; `request` reads a ModelInferRequest against a model
and writes its response; `tensors` holds the protocol's tensor codec; `describe`
answers ServerMetadata, ModelMetadata and ModelConfig; `stats` ModelStatistics.
"""
