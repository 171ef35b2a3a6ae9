"""Compile fastft's non-attention Triton kernels for sm_80 without a GPU (the attention kernels:
_triton_sm80_compile.py). Run as a script without TRITON_INTERPRET (tests/test_ops_devices.py).

Each kernel is compiled with the launch parameters its launcher uses on a GPU, in fp32 and bf16,
so what the interpreter tests (which never compile) rely on also builds for a real GPU: the int64
offsets, the CE kernel's barrier, the int8 dequantisation in the GEMM loop. Prints one JSON object
{"<kernel> <variant>": number of cubin bytes}.
"""
from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET", "0") == "1":
    sys.exit("run without TRITON_INTERPRET=1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from fastft.kernels import adamw as A  # noqa: E402
from fastft.kernels import fused_linear_cross_entropy as C  # noqa: E402
from fastft.kernels import lora_linear as L  # noqa: E402
from fastft.kernels import rms_norm as R  # noqa: E402
from fastft.kernels import rope as P  # noqa: E402
from fastft.kernels import swiglu as S  # noqa: E402


def compile_one(fn, types: dict, consts: dict, warps: int = 4) -> int:
    """types: argument name -> Triton type string for every non-constexpr argument."""
    sig = {name: ("constexpr" if name in consts else types[name]) for name in fn.arg_names}
    src = ASTSource(fn, sig, constexprs={(fn.arg_names.index(k),): v for k, v in consts.items()})
    compiled = triton.compile(src, target=GPUTarget("cuda", 80, 32), options={"num_warps": warps})
    cubin = compiled.asm.get("cubin")
    assert cubin, f"{fn.__name__}: no cubin"
    return len(cubin)


def main() -> None:
    out = {}
    for el in ("fp32", "bf16"):
        p = "*" + el
        out[f"swiglu_fwd {el}"] = compile_one(S._swiglu_fwd_kernel, {"g_ptr": p, "u_ptr": p, "y_ptr": p, "n": "i32"},
                                              {"MANUAL_BF16_RNE": False, "BLOCK": S.BLOCK})
        out[f"swiglu_bwd {el}"] = compile_one(
            S._swiglu_bwd_kernel, {"g_ptr": p, "u_ptr": p, "dy_ptr": p, "dg_ptr": p, "du_ptr": p, "n": "i32"},
            {"MANUAL_BF16_RNE": False, "BLOCK": S.BLOCK})
        out[f"rms_fwd {el}"] = compile_one(
            R._rms_fwd_kernel, {"x_ptr": p, "w_ptr": p, "y_ptr": p, "rstd_ptr": "*fp32", "n": "i32", "eps": "fp32"},
            {"MANUAL_BF16_RNE": False, "BLOCK": 4096})
        out[f"rms_bwd {el}"] = compile_one(
            R._rms_bwd_kernel, {"dy_ptr": p, "x_ptr": p, "w_ptr": "*fp32", "rstd_ptr": "*fp32", "dx_ptr": p,
                                "dw_part_ptr": "*fp32", "rows": "i32", "n": "i32", "rows_per_prog": "i32"},
            {"MANUAL_BF16_RNE": False, "BLOCK": 4096})
        ints = {k: "i32" for k in ("T", "half", "xs_b", "xs_h", "xs_t", "ys_b", "ys_h", "ys_t", "cs_b", "cs_t")}
        for bwd in (False, True):
            out[f"rope {'bwd' if bwd else 'fwd'} {el}"] = compile_one(
                P._rope_kernel, {"x_ptr": p, "y_ptr": p, "c_ptr": p, "s_ptr": p, **ints},
                {"BACKWARD": bwd, "MANUAL_BF16_RNE": False, "BLOCK": 64})
        for cap in (False, True):
            out[f"ce cap={cap} {el}"] = compile_one(
                C._ce_chunk_kernel, {"buf_ptr": p, "stride_row": "i32", "y_ptr": "*i64", "scale_ptr": "*fp32",
                                     "loss_ptr": "*fp32", "z_ptr": "*fp32", "correct_ptr": "*u8", "V": "i32",
                                     "smoothing": "fp32", "z_loss": "fp32", "softcap": "fp32"},
                {"CAP": cap, "WRITE_GRAD": True, "MANUAL_BF16_RNE": False, "BLOCK_V": 4096})
        out[f"adamw {el}"] = compile_one(
            A._adamw_kernel, {"p_ptr": p, "g_ptr": p, "m_ptr": "*fp32", "v_ptr": "*fp32", "vmax_ptr": "*fp32",
                              "w_ptr": "*fp32", "ctrl_ptr": "*fp32", "tab_ptr": "*fp32", "n": "i32", "w1": "fp32",
                              "beta2": "fp32", "omb2": "fp32", "eps": "fp32"},
            {"AMSGRAD": False, "MASTER": el == "bf16", "SPLIT": False, "MAXIMIZE": False, "MANUAL_BF16_RNE": False,
             "BLOCK": A.BLOCK})
        out[f"sumsq {el}"] = compile_one(A._sumsq_kernel, {"x_ptr": p, "out_ptr": "*fp32", "n": "i32"},
                                         {"BLOCK": A.BLOCK})
        for int8 in (False, True):
            ints = {k: "i32" for k in ("M", "N", "K", "K2", "stride_am", "stride_bk", "stride_bn", "stride_um",
                                       "stride_vk", "stride_vn", "stride_cm")}
            out[f"lora_mm int8={int8} {el}"] = compile_one(
                L._lora_mm_kernel, {"a_ptr": p, "b_ptr": "*i8" if int8 else p, "s_ptr": "*fp32", "u_ptr": p,
                                    "v_ptr": p, "bias_ptr": p, "c_ptr": p, **ints},
                {"IS_INT8": int8, "SCALE_ON_K": False, "HAS_LR": True, "HAS_BIAS": True, "UPCAST": False,
                 "IEEE": el == "fp32", "BM": 64, "BN": 128, "BK": 32, "BK2": 16})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
