"""The serving core, split by concern as Triton's core is.

- `registry`: lookup and states (`ModelRegistry`, `Model`, `ModelVersion`, `State`);
- `instances`: each model instance's inference thread and its results back on the loop;
- `health`: the one owner of readiness, and the watchdog's "not serving" reports;
- `batcher`: the queue policy (Triton's dynamic batcher);
- `loader`: loading and unloading one version (sessions, providers, warm-up, GPU memory);
- `manager`: the repository manager (what serves and when: model control, version policy).
"""
