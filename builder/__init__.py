"""The ResNet family in PyTorch, exported to verified ONNX in a model repository."""
