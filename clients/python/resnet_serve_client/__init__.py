"""Python SDK for resnet-serve."""
