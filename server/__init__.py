"""resnet-serve's gRPC server: repository loader, sessions, batcher, servicers."""
