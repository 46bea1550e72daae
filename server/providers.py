"""Execution providers: their names, whether CUDA can come up here, and the options
each session and provider is opened with.

`cuda_driver_present` and `cuda_total_memory` ask the driver, `serves_on_gpu` whether
the settings put the sessions on a GPU here; `why_no_cuda` finds why
the CUDA provider library does not load (the library and the symbol or file it misses)
so that `server.sessions.open_session` logs it in one line. `session_options`,
`cuda_provider_options` and `tensorrt_provider_options` are what every session is
opened with: the server's settings and the model's config.json.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
from pathlib import Path

import onnxruntime as ort

from server.config import Settings
from server.logs import one_line
from server.repository import ModelConfig, Optimization

CPU = "CPUExecutionProvider"
CUDA = "CUDAExecutionProvider"
TENSORRT = "TensorrtExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)

_ORT_ERROR = 3


def cuda_driver_present() -> bool:
    """Whether the CUDA driver library loads (false on machines without an NVIDIA GPU)."""
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def serves_on_gpu(settings: Settings) -> bool:
    """Whether the sessions run on a GPU: ``--device cuda``, or ``auto`` where ONNX Runtime
    offers CUDA (onnxruntime-gpu offers it on any host) and the NVIDIA driver loads."""
    if settings.device != "auto":
        return settings.device == "cuda"
    return CUDA in ort.get_available_providers() and cuda_driver_present()


def cuda_total_memory(device_id: int) -> int | None:
    """Bytes of memory on GPU `device_id`, from the driver API; None where it cannot say."""
    try:
        cuda = ctypes.CDLL("libcuda.so.1")
        device, total = ctypes.c_int(), ctypes.c_size_t()
        if cuda.cuInit(0) or cuda.cuDeviceGet(ctypes.byref(device), device_id):
            return None
        if cuda.cuDeviceTotalMem_v2(ctypes.byref(total), device):
            return None
    except (OSError, AttributeError):
        return None
    return total.value


def _provider_library() -> Path:
    return Path(ort.__file__).parent / "capi" / "libonnxruntime_providers_cuda.so"


def why_no_cuda() -> str:
    """Why the CUDA provider library does not load: the dynamic loader's own words."""
    library = _provider_library()
    if not library.is_file():
        return f"{library.name} is not installed (the CPU onnxruntime package?)"
    try:
        ctypes.CDLL(str(library), mode=os.RTLD_LAZY)
    except OSError as exc:
        if "Provider_GetHost" not in str(exc):  # a symbol ONNX Runtime itself provides
            return f"{library.name} does not load: {one_line(exc)}"
    return "the CUDA provider loads but did not come up (ONNX Runtime's log at WARNING says why)"


def session_options(settings: Settings, intra_op_threads: int) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.intra_op_num_threads = intra_op_threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.log_severity_level = _ORT_ERROR
    options.add_session_config_entry(
        "session.intra_op.allow_spinning", "1" if settings.allow_spinning else "0"
    )
    if settings.allow_spinning and settings.spin_duration_us:
        options.add_session_config_entry(
            "session.intra_op.spin_duration_us", str(settings.spin_duration_us)
        )
    return options


_NO_OPTIMIZATION = Optimization()


def cuda_provider_options(
    settings: Settings, optimization: Optimization = _NO_OPTIMIZATION, mem_limit: int | None = None
) -> dict[str, str]:
    """The CUDA provider's options: the server's (device, cuDNN search, arena) and the
    model's (TF32, CUDA graphs); `mem_limit` is this session's share when the flag is unset."""
    cuda = optimization.cuda
    options = {
        "device_id": str(settings.cuda_device_id),
        "cudnn_conv_algo_search": settings.cudnn_conv_algo_search,
        "arena_extend_strategy": settings.cuda_arena_extend_strategy,
        # one stream per session; outputs are copied to the host anyway
        "do_copy_in_default_stream": "1",
        "use_tf32": "1" if cuda.use_tf32 else "0",
    }
    limit = settings.cuda_mem_limit or mem_limit
    if limit is not None:
        options["gpu_mem_limit"] = str(limit)
    if cuda.graphs:
        options["enable_cuda_graph"] = "1"
    return options


def tensorrt_provider_options(settings: Settings, config: ModelConfig) -> dict[str, str]:
    """TensorRT's options: engines for batch sizes 1..max_batch_size, cached on disk."""
    trt = config.optimization.tensorrt
    assert trt is not None
    cache = settings.tensorrt_cache_dir or Path(tempfile.gettempdir()) / "resnet-serve-tensorrt"
    name = config.input.name

    def shape(batch: int) -> str:
        return f"{name}:" + "x".join(str(d) for d in config.input.shape(batch))

    # ONNX Runtime's Python API takes TensorRT's switches as "True" or "False" and refuses the
    # session on anything else ("1" included), where CUDA's take "1" and "0"
    options = {
        "device_id": str(settings.cuda_device_id),
        "trt_fp16_enable": str(trt.precision == "fp16"),
        "trt_max_workspace_size": str(trt.max_workspace_bytes),
        "trt_engine_cache_enable": "True",
        "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True",
        "trt_timing_cache_path": str(cache),
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(config.batching.max_batch_size),
        "trt_profile_max_shapes": shape(config.batching.max_batch_size),
    }
    if config.optimization.cuda.graphs:
        options["trt_cuda_graph_enable"] = "True"
    return options
