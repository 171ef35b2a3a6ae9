"""Compile fastft's attention Triton kernels for sm_80 without a GPU and print their shared memory.

Run as a script in a process without TRITON_INTERPRET (under the interpreter ``@triton.jit``
returns interpreted functions that cannot be compiled): tests/test_attention_triton.py does so.
Prints one JSON object: {"<dtype> D=<bd> <kernel>": shared bytes}.
"""
from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastft.kernels import attention as A  # noqa: E402

TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def _signature(fn, elem: str, consts: dict) -> dict:
    sig = {}
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in ("lse_ptr", "delta_ptr"):
            sig[name] = "*fp32"
        elif name in ("start_ptr", "end_ptr"):  # packed rows' (B, T) int32 sample tables
            sig[name] = "*i32"
        elif name.endswith("_ptr"):
            sig[name] = "*" + elem
        elif name == "scale":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def main() -> None:
    target = GPUTarget("cuda", 80, 32)
    out = {}
    for dtype, elem in TYPES.items():
        for d in (64, 128, 256):
            cfg = A._config(d, dtype)
            warps = cfg.pop("num_warps")
            causal, packed = dict(cfg, SEGMENTS=False), dict(cfg, SEGMENTS=True)
            kernels = {"fwd": (A._attn_fwd_kernel, causal),
                       "delta": (A._attn_bwd_delta_kernel, dict(BM=cfg["BM"], BD=cfg["BD"])),
                       "dkdv": (A._attn_bwd_dkdv_kernel, causal), "dq": (A._attn_bwd_dq_kernel, causal),
                       "fwd packed": (A._attn_fwd_kernel, packed), "dkdv packed": (A._attn_bwd_dkdv_kernel, packed),
                       "dq packed": (A._attn_bwd_dq_kernel, packed)}
            for name, (fn, consts) in kernels.items():
                src = ASTSource(fn, _signature(fn, elem, consts),
                                constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
                compiled = triton.compile(src, target=target, options={"num_warps": warps})
                assert compiled.asm.get("cubin"), f"{elem} D={d} {name}: no cubin"
                out[f"{elem} D={d} {name}"] = compiled.metadata.shared
    print(json.dumps(out))


if __name__ == "__main__":
    main()
