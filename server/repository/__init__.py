"""What the builder and the server share, importable without grpc or ONNX Runtime."""
