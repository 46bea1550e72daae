"""``python -m bench gpu_check`` (``make gpu-check``): the acceptance run on an NVIDIA GPU.

One command, from a fresh clone on a bare GPU machine (``make gpu-check`` installs the
``gpu`` extra first), in at most about 8 minutes, and about 4 more for step 6 (60 slices
of 2 s, each with perf_analyzer's start-up):

1. builds ARCH (resnet50) in fp32 and fp16, and once more in fp16 with float16 inputs and
   outputs replayed as CUDA graphs over batch buckets (config.json's ``optimization``),
   and trains the digits model in fp32 and fp16;
2. serves them all with ``--device DEVICE`` (bench.serving, the bench's one harness);
3. asserts every instance of every model runs on DEVICE's provider (the metric
   ``resnet_serve_execution_provider`` and GetModel's providers agree);
4. compares the served logits (v2 ModelInfer) with CPU ONNX Runtime on the same inputs:
   fp32 within the build's tolerance (verification.json), fp16's top-1 (the graphs model's
   too) on the digits' held-out images and the shared photos as the build judges
   precision: equal wherever fp32's top-1 margin exceeds twice fp16's error bound
   (near-ties are counted, not failed);
5. measures raw ONNX Runtime on DEVICE (batch 1 and max_batch_size) and the server
   (Classify, uint8, the bench's load generator) at each concurrency;
6. runs the front-end sweep of ``python -m bench frontend`` (`bench.frontends`) on DEVICE:
   the null model and resnet20 (uint8 input, built here) served by one process and by 1,
   2, 4 and 8 front ends, requests/s, p50, p99 and batch size at concurrency 1, 16 and 64,
   CPU per request by process and the ceiling projected for 16 and 32 cores;
7. measures the engine alone on DEVICE (``python -m bench engine``, `bench.engine_load`:
   fed without gRPC at 1, 16, 64 and 256 requests in flight), the ceiling of one engine;
8. writes ``gpu-check.json`` and ``gpu-check.md`` into --out.

Without a GPU, ``--device cuda`` exits 2 and says why. ``--device cpu`` is the dry run,
small and fast (resnet20, 1 training epoch, short windows; the sweep: the null model, one
process against one front end, at one concurrency; the engine alone at 1 and 8 in flight):
the test suite runs it.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import grpc
import numpy as np
from resnet_serve_client import Client
from resnet_serve_client.proto.inference import grpc_service_pb2 as v2
from resnet_serve_client.proto.inference import grpc_service_pb2_grpc as v2_grpc

from bench import cli, engine_load, frontend, frontends, load, null_model, raw, serving
from bench.repository import Served, build_missing
from server.config import Settings
from server.repository import (
    MODEL_FILE,
    ImageLimits,
    ModelConfig,
    Verification,
    latest_version,
    prepare_encoded,
    top1_agreement,
)

HERE = Path(__file__).resolve().parent
PROVIDERS = {"cuda": "CUDAExecutionProvider", "cpu": "CPUExecutionProvider"}
SHARED_PHOTOS = (
    HERE.parent.parent / "shared" / "data" / "photos",
    Path("/work/shared/data/photos"),
)
NO_GPU = 2


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser("gpu_check", help="acceptance run on an NVIDIA GPU (make gpu-check)")
    parser.add_argument("--device", choices=sorted(PROVIDERS), default="cuda")
    parser.add_argument("--arch", help="default: resnet50 on cuda, resnet20 on cpu")
    parser.add_argument("--epochs", type=int, help="digits training; default 8 on cuda, 1 on cpu")
    parser.add_argument("--concurrency", default="1,16,64", help="default: 1,16,64")
    parser.add_argument("--seconds", type=float, help="per level; default 10 on cuda, 1 on cpu")
    parser.add_argument("--photos", type=Path, help="folder of JPEGs; default: the shared photos")
    parser.add_argument(
        "--frontends", help="the sweep's front-end counts; default 0,1,2,4,8 on cuda, 0,1 on cpu"
    )
    parser.add_argument(
        "--sweep-concurrency", help="the sweep's concurrencies; default 1,16,64 on cuda, 4 on cpu"
    )
    parser.add_argument(
        "--sweep-seconds", type=float, help="per sweep cell; default 4 on cuda, 0.6 on cpu"
    )
    cli.add_work(parser, cli.TMP / "gpu-check")
    parser.add_argument("--out", type=Path, default=cli.RESULTS)
    parser.set_defaults(func=main)


def no_gpu_reason() -> str | None:
    """Why CUDA cannot run here, or None."""
    import onnxruntime as ort

    from server.providers import CUDA, cuda_driver_present

    if CUDA not in ort.get_available_providers():
        return "this onnxruntime has no CUDA provider (install the gpu extra: make gpu-check)"
    if not cuda_driver_present():
        return "no NVIDIA driver (libcuda.so.1 does not load): this machine has no GPU"
    return None


def _resnet_serve(*args: str) -> None:
    command = [str(Path(sys.executable).with_name("resnet-serve")), *args]
    subprocess.run(command, check=True, stdout=subprocess.DEVNULL)


# The graphs model's config.json: one CUDA graph per bucket (max_batch_size is always one)
GRAPHS = {"graphs": True, "batch_buckets": [1, 8]}


def build(repo: Path, work: Path, arch: str, epochs: int) -> dict[str, str]:
    """Models built once into `repo`: role → model name. ``graphs``: fp16 with float16 inputs
    and outputs (``--fp16-io``), replayed as CUDA graphs (`GRAPHS`): the GPU path's
    buckets, graphs and casts, which no other model takes."""
    names = {"fp32": f"{arch}_fp32", "fp16": f"{arch}_fp16", "graphs": f"{arch}_graphs",
             "digits": "digits", "digits_fp16": "digits_fp16"}  # fmt: skip
    for role, flags in (("fp32", ["fp32"]), ("fp16", ["fp16"]), ("graphs", ["fp16", "--fp16-io"])):
        if not (repo / names[role]).is_dir():
            _resnet_serve("build", arch, "--repo", str(repo), "--name", names[role],
                          "--precision", *flags)  # fmt: skip
    config_file = repo / names["graphs"] / "config.json"
    config = json.loads(config_file.read_text())
    config.setdefault("optimization", {}).setdefault("cuda", {}).update(GRAPHS)
    config_file.write_text(json.dumps(config, indent=2) + "\n")
    if not (repo / "digits_fp16").is_dir():
        _resnet_serve("train", "--repo", str(repo), "--out", str(work / "digits"),
                      "--epochs", str(epochs), "--precision", "fp32", "fp16")  # fmt: skip
    return names


def served_logits(address: str, name: str, config: ModelConfig, batch: np.ndarray) -> np.ndarray:
    """The model's raw logits through v2 ModelInfer (float32 input, no classification)."""
    tensor = v2.ModelInferRequest.InferInputTensor
    request = v2.ModelInferRequest(
        model_name=name,
        inputs=[tensor(name=config.input.name, datatype="FP32", shape=list(batch.shape))],
        outputs=[v2.ModelInferRequest.InferRequestedOutputTensor(name=config.output.name)],
        raw_input_contents=[np.ascontiguousarray(batch, np.float32).tobytes()],
    )
    with grpc.insecure_channel(address) as channel:
        response = v2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(request, timeout=120)
    return np.frombuffer(response.raw_output_contents[0], np.float32).reshape(
        list(response.outputs[0].shape)
    )


def cpu_logits(model_file: Path, config: ModelConfig, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(str(model_file), providers=["CPUExecutionProvider"])
    feed = batch.astype(np.float16) if session.get_inputs()[0].type == "tensor(float16)" else batch
    return np.asarray(session.run(None, {config.input.name: feed})[0], np.float32)


def photos_batch(folder: Path | None, config: ModelConfig) -> np.ndarray | None:
    found = [folder] if folder else [p for p in SHARED_PHOTOS if p.is_dir()]
    if not found:
        return None
    files = sorted(p for p in found[0].iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    limits = ImageLimits(max_image_bytes=64 << 20, max_image_pixels=100_000_000)
    return np.stack([prepare_encoded(f.read_bytes(), config, limits) for f in files])


def digits_batch(config: ModelConfig) -> tuple[np.ndarray, np.ndarray]:
    from builder.digits import inputs, load_digits

    held_out = load_digits().held_out
    return inputs(held_out.pixels, config), held_out.labels


def provider_check(server: serving.Server, names: list[str], expected: str) -> dict[str, Any]:
    """Every instance of every model on `expected`: from /metrics and from GetModel."""
    metric: dict[str, list[str]] = {}
    for line in server.metrics().splitlines():
        if line.startswith("resnet_serve_execution_provider{") and line.endswith(" 1.0"):
            labels = dict(p.split("=", 1) for p in line[line.index("{") + 1 : line.index("}")]
                          .replace('"', "").split(","))  # fmt: skip
            metric.setdefault(labels["model"], []).append(labels["provider"])
    with Client(server.address, timeout=30) as client:
        get_model = {n: list(client.get_model(n).versions[0].providers) for n in names}
    ok = all(
        get_model[n] and set(get_model[n]) == {expected} == set(metric.get(n, [])) for n in names
    )
    return {"expected": expected, "metric": metric, "get_model": get_model, "passed": ok}


def logits_check(address: str, repo: Path, names: dict[str, str], photos: Path | None) -> dict:
    """fp32 within the build's tolerance; fp16's top-1 judged against CPU fp32 on real images
    as the build judges precision (`top1_agreement`: near-ties may flip, nothing else)."""
    out: dict[str, Any] = {}
    fp32_config = ModelConfig.load(repo / names["fp32"])
    record = Verification.load(latest_version(repo / names["fp32"]))
    max_abs = float(record.thresholds.get("max_abs_error", 5e-3))
    max_rel = float(record.thresholds.get("max_rel_error", 1e-3))
    rng = np.random.default_rng(0)
    inputs = rng.standard_normal(fp32_config.input.shape(8), dtype=np.float32)
    real = photos_batch(photos, fp32_config)
    for label, batch in (("random", inputs), ("photos", real)):
        if batch is None:
            out[f"fp32_{label}"] = {"skipped": "no photos found"}
            continue
        model = latest_version(repo / names["fp32"]) / MODEL_FILE
        expected = cpu_logits(model, fp32_config, batch)
        got = served_logits(address, names["fp32"], fp32_config, batch)
        abs_error = float(np.abs(got - expected).max())
        rel_error = abs_error / float(np.abs(expected).max())
        out[f"fp32_{label}"] = {
            "images": len(batch), "max_abs_error": abs_error, "max_rel_error": rel_error,
            "limits": [max_abs, max_rel], "passed": abs_error <= max_abs and rel_error <= max_rel,
        }  # fmt: skip
    for fp32, fp16, source in (("fp32", "fp16", "photos"), ("fp32", "graphs", "photos"),
                               ("digits", "digits_fp16", "digits")):  # fmt: skip
        config = ModelConfig.load(repo / names[fp32])
        if source == "digits":
            batch, _labels = digits_batch(config)
        else:
            batch = real
        key = f"{'graphs' if fp16 == 'graphs' else 'fp16'}_{source}"
        if batch is None:
            out[key] = {"skipped": "no photos found"}
            continue
        reference = cpu_logits(latest_version(repo / names[fp32]) / MODEL_FILE, config, batch)
        # the graphs model's calls fill each of its buckets: 1 image, up to 8, the rest
        parts = (np.split(batch, [1, 9]) if fp16 == "graphs"
                 else np.array_split(batch, max(1, len(batch) // 32)))  # fmt: skip
        served = np.concatenate(
            [served_logits(address, names[fp16], config, part) for part in parts if len(part)]
        )
        bound = Verification.load(latest_version(repo / names[fp16])).thresholds
        agreement = top1_agreement(reference, served, float(bound.get("max_abs_error", 0.25)))
        out[key] = agreement.as_dict()
    return out


def speed(server: serving.Server, repo: Path, name: str, device: str, levels: list[int],
          seconds: float) -> dict[str, Any]:  # fmt: skip
    """Raw ONNX Runtime on `device` and the server (Classify, uint8) at each concurrency."""
    config = ModelConfig.load(repo / name)
    model_file = latest_version(repo / name) / MODEL_FILE
    providers: list[Any] = ["CPUExecutionProvider"]
    if device == "cuda":
        from server.providers import CUDA, cuda_provider_options
        from server.sessions import preload_cuda_libraries

        # the CUDA libraries of the gpu extra's wheels are found as the server finds them;
        # without them ONNX Runtime would open this session on the CPU and say so only in
        # its log
        preload_cuda_libraries()
        providers = [(CUDA, cuda_provider_options(Settings()))]
    session = raw.Raw(model_file, config.input, providers=providers)
    came_up = session.session.get_providers()[0]  # the check fails unless it is DEVICE's
    try:
        raw_rows = [
            session.measure(batch, seconds).result().as_dict()
            for batch in sorted({1, config.batching.max_batch_size})
        ] if came_up == PROVIDERS[device] else []  # fmt: skip
    finally:
        session.close()
    served = Served(name, config, model_file)
    variant = next(v for v in load.VARIANTS if v.key == "uint8")
    requests = load.requests_for(variant, served, [])
    rows = []
    for concurrency in levels:
        level = asyncio.run(
            load.run_variant(server, served, variant, concurrency, requests,
                             warmup=min(2.0, seconds), seconds=seconds)
        )  # fmt: skip
        rows.append(load.level_row(served, variant, level) | {"concurrency": concurrency})
    return {"raw_provider": came_up, "raw": raw_rows, "server": rows}


def sweep(args: argparse.Namespace, dry: bool) -> dict[str, Any]:
    """The front-end sweep (`bench.frontends`) on `args.device`: full on a GPU, tiny dry."""
    models = (null_model.NAME,) if dry else ("resnet20", null_model.NAME)
    source = args.work / "models"
    build_missing(source, [m for m in models if m != null_model.NAME])
    repo = args.work / "sweep" / "repo"
    served = frontend.serve_models(models, source, repo, max_batch_size=64)
    plan = frontends.SweepPlan(
        models=models,
        frontends=cli.ints(args.frontends or ("0,1" if dry else "0,1,2,4,8")),
        concurrencies=cli.ints(args.sweep_concurrency or ("4" if dry else "1,16,64")),
        seconds=args.sweep_seconds or (0.6 if dry else 4.0),
        rounds=1 if dry else 2,
        warmup=0.0 if dry else 1.0,
        device=args.device,
    )
    requests = {model.name: frontend.request_for(model) for model in served}
    return frontends.run(repo, requests, plan, args.work / "sweep")


def markdown(results: dict[str, Any]) -> str:
    lines = [
        f"# gpu-check: {results['arch']} on {results['device']} ({results['gpu']})", "",
        f"Verdict: **{'PASSED' if results['passed'] else 'FAILED'}** in "
        f"{results['seconds']:.0f} s; onnxruntime {results['onnxruntime']}.", "",
        f"Providers: {'all on ' + results['providers']['expected'] if results['providers']['passed'] else json.dumps(results['providers'])}",  # noqa: E501
        "", "| check | images | result |", "|---|---:|---|",
    ]  # fmt: skip
    for key, value in results["logits"].items():
        if "skipped" in value:
            lines.append(f"| {key} | - | skipped: {value['skipped']} |")
        elif "top1_equal" in value:
            lines.append(f"| {key} | {value['images']} | {value['summary']} |")
        else:
            error = f"max abs {value['max_abs_error']:.2e}, rel {value['max_rel_error']:.2e}"
            lines.append(f"| {key} | {value['images']} | {error} (limits {value['limits']}) |")
    raw_on = results["speed"].get("raw_provider")
    if raw_on is not None and raw_on != PROVIDERS[results["device"]]:
        lines += ["", f"Raw ONNX Runtime came up on {raw_on}: no raw figures (check failed)."]
    lines += ["", "| raw ONNX Runtime batch | img/s | p50 ms | p99 ms |", "|---:|---:|---:|---:|"]
    for row in results["speed"]["raw"]:
        lines.append(f"| {row['batch']} | {row['img_per_s']} | {row['p50_ms']} | {row['p99_ms']} |")
    lines += ["", "| server concurrency | img/s | p50 ms | p99 ms | mean batch |",
              "|---:|---:|---:|---:|---:|"]  # fmt: skip
    for row in results["speed"]["server"]:
        lines.append(f"| {row['concurrency']} | {row.get('img_per_s')} | {row.get('p50_ms')} | "
                     f"{row.get('p99_ms')} | {row['batch_mean']} |")  # fmt: skip
    if "sweep" in results:
        lines += ["", "## Front-end sweep", "", *frontends.markdown(results["sweep"])]
    if "engine" in results:
        lines += ["", "## The engine alone", "", *engine_load.table(results["engine"]["rows"])]
    return "\n".join(lines) + "\n"


def main(args: argparse.Namespace) -> int:
    started = time.monotonic()
    dry = args.device == "cpu"
    if not dry and (why := no_gpu_reason()) is not None:
        cli.say(f"gpu-check: no GPU to check: {why}")
        return NO_GPU
    import onnxruntime as ort

    arch = args.arch or ("resnet20" if dry else "resnet50")
    epochs = args.epochs or (1 if dry else 8)
    seconds = args.seconds or (1.0 if dry else 10.0)
    levels = list(cli.ints(args.concurrency))
    repo = args.work / "models"
    names = build(repo, args.work, arch, epochs)
    expected = PROVIDERS[args.device]
    log = args.work / "server.log"
    with serving.running(repo, log, ["--device", args.device]) as server:
        providers = provider_check(server, sorted(names.values()), expected)
        logits = logits_check(server.address, repo, names, args.photos)
        measured = speed(server, repo, names["fp32"], args.device, levels, seconds)
    swept = sweep(args, dry)
    engine = engine_load.execute(
        engine_load.EnginePlan(
            concurrencies=(1, 8) if dry else (1, 16, 64, 256),
            feeders=(1,) if dry else (1, 8),
            seconds=0.5 if dry else 4.0,
            warmup=0.2 if dry else 1.0,
            rounds=1 if dry else 2,
            device=args.device,
        ),
        args.work / "engine",
    )
    passed = (providers["passed"] and all(v.get("passed", True) for v in logits.values())
              and measured["raw_provider"] == expected)  # fmt: skip
    results = {
        "arch": arch, "device": args.device,
        "gpu": platform.processor() if dry else _gpu_name(),
        "onnxruntime": ort.__version__, "passed": passed, "providers": providers,
        "logits": logits, "speed": measured, "sweep": swept, "engine": engine,
        "seconds": round(time.monotonic() - started, 1),
        "warmup_log": serving_lines(log),
    }  # fmt: skip
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu-check.json").write_text(json.dumps(results, indent=2) + "\n")
    (args.out / "gpu-check.md").write_text(markdown(results))
    print(markdown(results))
    return 0 if passed else 1


def serving_lines(log: Path) -> list[str]:
    """How each model came up: provider, instances, warm-up sizes and time, and whether its
    batches go to the GPU from page-locked memory (a line says so where they do not)."""
    wanted = ("runs on", "READY in", "reopening", "UNAVAILABLE", "page-locked")
    return [line.strip() for line in log.read_text().splitlines() if any(w in line for w in wanted)]


def _gpu_name() -> str:
    try:
        query = ["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"]
        found = subprocess.run(query, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown GPU"
    return found.stdout.strip() or "unknown GPU"
