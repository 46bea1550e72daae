"""The protocol adapters: each turns its messages into `server.request_path` requests and back.

- `server.protocols.v1`: ``resnet_serve.v1.Classifier`` (Classify, ClassifyStream,
  ListModels, GetModel);
- `server.protocols.v2`: ``inference.GRPCInferenceService``, the Open Inference
  Protocol v2 as Triton and KServe speak it;
- `server.protocols.calls`: what the gRPC adapters share (deadlines, streams).
"""
