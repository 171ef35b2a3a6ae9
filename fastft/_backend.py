"""Backend selection for every fused op, in one place.

Backends, fastest first for each device:

* ``triton`` - kernels/ (GPU; on CPU only under ``TRITON_INTERPRET=1``, which tests use).
* ``cuda``   - csrc/cuda via ``fastft._C_cuda`` (GPU).
* ``cpu``    - csrc/cpu via ``fastft._C`` (multi-threaded, SIMD dispatched at run time).
* ``torch``  - the pure-PyTorch reference: the fallback everywhere and the test oracle.

``FASTFT_BACKEND=auto|triton|cuda|cpu|torch`` forces a choice for every op and
``FASTFT_BACKEND_<OP>`` (e.g. ``FASTFT_BACKEND_ATTENTION=triton``) for one op; a forced backend
that is not available for an op raises a clear error rather than silently running something else.

On a CUDA device ``auto`` gives the vendor's kernels the work they are best at (:data:`CUDA_VENDOR`):
the frozen base GEMMs of LoRA/int8 layers run on cuBLAS (``torch.addmm``; int8 weights are
dequantised tile by tile into it) and attention on PyTorch's SDPA (FlashAttention/cuDNN/
memory-efficient), with fastft's fusion around them (LoRA's low-rank side and in-place
accumulation, fused linear CE, RMSNorm, SwiGLU, RoPE, multi-tensor AdamW). fastft's own Triton/CUDA
GEMM and attention kernels replace them only when opted in per op
(``FASTFT_BACKEND_INT8_LINEAR=triton|cuda``, ``FASTFT_BACKEND_ATTENTION=triton|cuda``) until a
benchmark on a real GPU shows them faster. The CPU choice is unchanged: fastest built backend.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import warnings
from functools import lru_cache

import torch

BACKENDS = ("triton", "cuda", "cpu", "torch")
# Which backends each op implements. Ops add themselves here when they gain a backend.
OP_BACKENDS: dict[str, tuple[str, ...]] = {
    "adamw": ("triton", "cuda", "cpu", "torch"),
    "cross_entropy": ("triton", "cuda", "cpu", "torch"),
    "int8_linear": ("triton", "cuda", "cpu", "torch"),
    "rms_norm": ("triton", "cuda", "cpu", "torch"),
    "swiglu": ("triton", "cuda", "cpu", "torch"),
    "rope": ("triton", "cuda", "cpu", "torch"),
    "attention": ("triton", "cuda", "cpu", "torch"),
}
# On CUDA, ``auto`` leaves these ops to the vendor's kernels (the "torch" backend of the op), with
# what runs there; fastft's own kernels for them are opt-in (FASTFT_BACKEND_<OP>, module docstring).
CUDA_VENDOR: dict[str, str] = {
    "attention": "PyTorch SDPA (FlashAttention / cuDNN / memory-efficient)",
    "int8_linear": "cuBLAS via torch.addmm (int8: dequantised tiles + addmm), LoRA side fused in place",
}
# On CUDA, ``auto`` prefers these backends in this order where built (others keep BACKENDS' order):
# the CUDA AdamW updates every parameter of a group in one multi-tensor launch, the Triton one
# launches once per parameter (hundreds of launches per step for a 1B model).
CUDA_ORDER: dict[str, tuple[str, ...]] = {"adamw": ("cuda", "triton", "torch")}
# dtype codes shared with csrc/include/fastft/common.h
DTYPE_CODES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_warned: set[str] = set()


def _warn_once(key: str, msg: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(msg, RuntimeWarning, stacklevel=3)


@lru_cache(maxsize=None)
def cpu_ext():
    """The ``fastft._C`` module, or None (with one warning) when it was not built."""
    try:
        return importlib.import_module("fastft._C")
    except ImportError as e:  # pragma: no cover - depends on the install
        _warn_once("cpu_ext", f"fastft: C++ extension fastft._C not available ({e}); "
                   "falling back to the pure-PyTorch reference ops.")
        return None


@lru_cache(maxsize=None)
def cuda_ext():
    """The ``fastft._C_cuda`` module, or None when it was not built or cannot load."""
    try:
        return importlib.import_module("fastft._C_cuda")
    except ImportError:
        return None


@lru_cache(maxsize=None)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def requested_backend() -> str:
    value = os.environ.get("FASTFT_BACKEND", "auto").strip().lower()
    if value not in ("auto",) + BACKENDS:
        raise ValueError(f"FASTFT_BACKEND={value!r}: expected one of auto, {', '.join(BACKENDS)}")
    return value


def op_override(op: str) -> str | None:
    """The per-op override ``FASTFT_BACKEND_<OP>`` (None when unset or ``auto``)."""
    key = "FASTFT_BACKEND_" + op.upper()
    value = os.environ.get(key, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in BACKENDS:
        raise ValueError(f"{key}={value!r}: expected one of auto, {', '.join(BACKENDS)}")
    return value


def device_of(t: torch.Tensor):
    """Context that makes ``t``'s GPU the current device for a kernel launch (Triton and the CUDA
    extension launch on the current device, which need not be the tensors' one with
    ``device_map``/multi-GPU); a no-op for CPU tensors."""
    if t.device.type == "cuda":
        return torch.cuda.device(t.device)
    return contextlib.nullcontext()


def on_input_device(fn):
    """Decorator for functions that launch kernels: runs ``fn`` under :func:`device_of` of its
    first tensor argument (or the first tensor of its first list argument)."""
    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        t = _first_tensor(args)
        if t is None:
            return fn(*args, **kwargs)
        with device_of(t):
            return fn(*args, **kwargs)
    return wrapper


def _first_tensor(args) -> torch.Tensor | None:
    for a in args:
        if isinstance(a, torch.Tensor):
            return a
        if isinstance(a, (list, tuple)) and a and isinstance(a[0], torch.Tensor):
            return a[0]
    return None


def available_backends(op: str, device: torch.device | str) -> list[str]:
    """Backends that can run ``op`` on tensors living on ``device``, fastest first."""
    device = torch.device(device)
    implemented = OP_BACKENDS.get(op, ("torch",))
    out = []
    for b in implemented:
        if b == "triton" and triton_available() and (device.type == "cuda" or triton_interpret()):
            out.append(b)
        elif b == "cuda" and device.type == "cuda":
            ext = cuda_ext()
            if ext is not None and op in getattr(ext, "ops", ()):
                out.append(b)
        elif b == "cpu" and device.type == "cpu":
            ext = cpu_ext()
            if ext is not None and op in getattr(ext, "ops", ()):
                out.append(b)
        elif b == "torch":
            out.append(b)
    return out


def choose_backend(op: str, device: torch.device | str, forced: str | None = None) -> str:
    """The backend ``op`` will use on ``device``.

    ``forced`` (an argument) beats ``FASTFT_BACKEND_<OP>`` beats ``FASTFT_BACKEND`` beats ``auto``.
    Under ``auto`` the Triton interpreter is never chosen on CPU (it is a test tool,
    100x slower than the C++ kernels; tests force it explicitly), and on CUDA the ops of
    :data:`CUDA_VENDOR` run the vendor's kernels and :data:`CUDA_ORDER` reorders the rest.
    """
    want = forced or op_override(op) or requested_backend()
    avail = available_backends(op, device)
    if want == "auto":
        device = torch.device(device)
        if device.type == "cpu":
            avail = [b for b in avail if b != "triton"]
        elif device.type == "cuda":
            if op in CUDA_VENDOR:
                return "torch"
            order = CUDA_ORDER.get(op)
            if order:
                avail = sorted(avail, key=lambda b: order.index(b) if b in order else len(order))
        return avail[0] if avail else "torch"
    if want not in avail:
        raise RuntimeError(
            f"fastft: backend {want!r} requested for op {op!r} on {torch.device(device).type}, "
            f"but only {', '.join(avail) or 'none'} is available there")
    return want


def describe() -> dict:
    """Everything ``fastft env`` prints: versions, CPU features, built backends, op choices."""
    import platform

    info: dict = {"python": platform.python_version(), "torch": torch.__version__,
                  "platform": platform.platform(), "processor": _cpu_name()}
    for mod in ("transformers", "triton", "peft"):
        info[mod] = package_status(mod)
    info["optional"] = {mod: package_status(mod) for mod in OPTIONAL_PACKAGES}
    ext = cpu_ext()
    info["cpu_features"] = ext.cpu_features() if ext is not None else "unknown (fastft._C not built)"
    info["built"] = {
        "fastft._C (cpu)": list(getattr(ext, "ops", [])) if ext is not None else "not built",
        "fastft._C_cuda (cuda)": list(getattr(cuda_ext(), "ops", [])) if cuda_ext() is not None else "not built",
        "triton": triton_available(),
    }
    info["cuda_available"] = torch.cuda.is_available()
    from fastft.runtime import describe as malloc_pages

    info["malloc"] = malloc_pages()
    info["FASTFT_BACKEND"] = os.environ.get("FASTFT_BACKEND", "auto")
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    choices = {}
    for op in OP_BACKENDS:
        choices[op] = f"{_choice(op, dev)} (on {dev})"
    if dev == "cpu" and choices.get("attention", "").startswith("cpu") and hasattr(ext, "attention_bf16_dot"):
        dot = ext.attention_has_bf16_dot() and ext.attention_bf16_dot()
        choices["attention"] += ", bf16 inputs: " + ("AVX512-BF16 dot products" if dot else "fp32 FMA tiles")
    if dev == "cpu" and choices.get("attention", "").startswith("cpu") and hasattr(ext, "attention_tile_isas"):
        choices["attention"] += f", fp32 tiles: {ext.attention_tile_isas()[-1]}"
    info["ops"] = choices
    info["ops_by_device"] = ops_by_device()
    return info


def _choice(op: str, dev: str) -> str:
    try:
        return choose_backend(op, dev)
    except (RuntimeError, ValueError) as e:
        return f"error: {e}"


def ops_by_device() -> dict[str, str]:
    """Per op, the path it takes on CPU and on a CUDA GPU (the latter as it would be chosen with
    this process's environment when no GPU is present here)."""
    gpu_note = "" if torch.cuda.is_available() else " [no GPU here: the rule]"
    out = {}
    for op in OP_BACKENDS:
        cpu = _choice(op, "cpu")
        cuda = _choice(op, "cuda")
        if cuda == "torch" and op in CUDA_VENDOR:
            cuda = f"torch = {CUDA_VENDOR[op]}; fastft's own: FASTFT_BACKEND_{op.upper()}=triton|cuda"
        out[op] = f"cpu: {cpu}; cuda: {cuda}{gpu_note}"
    return out


# optional packages whose state decides what a feature does (fastft env lists them)
OPTIONAL_PACKAGES = ("matplotlib", "datasets", "tensorboard", "bitsandbytes", "optuna", "liger_kernel", "kernels")


def package_status(name: str) -> str:
    """``name``'s version, ``not installed``, or the real error when it is installed but its import
    fails (a broken install or a shadowing folder must not read as "not installed")."""
    if importlib.util.find_spec(name) is None:
        return "not installed"
    try:
        mod = importlib.import_module(name)
    except Exception as e:  # noqa: BLE001 - any import-time failure is what the user needs to see
        msg = str(e).splitlines()[0] if str(e) else ""
        return f"installed but fails to import: {type(e).__name__}: {msg}"
    version = getattr(mod, "__version__", None)
    if version is None:
        from importlib.metadata import PackageNotFoundError, version as dist_version

        try:
            version = dist_version(name.replace("_", "-"))
        except PackageNotFoundError:
            version = "unknown version"
    return f"{version} ({os.path.dirname(getattr(mod, '__file__', '') or '')})" if name == "kernels" else version


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform
    return platform.processor() or "unknown"


def ptr(t: torch.Tensor) -> int:
    """Raw data pointer of a tensor for the C++ boundary."""
    return t.data_ptr()
