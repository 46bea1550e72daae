"""The benchmark behind ``make bench``: the server against raw ONNX Runtime, in one run.

One run (``python -m bench``) measures, on the same machine and minutes apart:

1. raw ONNX Runtime in this process, each batch size of the plan (`bench.raw`);
2. the server (`bench.serving` starts it) through Classify with uint8 tensors and
   with 1-megapixel JPEGs, and through the v2 ModelInfer, with dynamic batching
   on, and through Classify with batching off (max batch 1), at each concurrency
   (`bench.load`, driving the client SDK's load generator);

then writes the figures as JSON to ``bench/results/`` and renders
``docs/benchmarks.md`` with its tables and plots (`bench.report`, `bench.plots`).
"""
