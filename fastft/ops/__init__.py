"""Fused ops. Each op module holds its pure-PyTorch reference (the fallback and test oracle), its
autograd.Function and the single backend choice; the package exports the public functions::

    from fastft.ops import (fused_linear_cross_entropy, lora_linear, int8_linear, causal_attention,
                            rms_norm, swiglu, rope)

The names are functions, not the same-named submodules: they are bound here after each
submodule is imported (Python sets the package attribute to the submodule when it first loads
it, then these imports rebind it), so ``fastft.ops.rms_norm`` is the function while
``from fastft.ops.rms_norm import rms_norm_reference`` still reads the module. The op modules
need only torch and ``fastft._backend`` (Triton/C++ backends load on first use), so importing
them all here costs ~60 ms.
"""
from fastft.ops.attention import attention_reference, causal_attention
from fastft.ops.fused_linear_cross_entropy import (FusedCEOutput, FusedLinearCrossEntropyLoss,
                                                   fused_linear_cross_entropy,
                                                   fused_linear_cross_entropy_reference)
from fastft.ops.lora_linear import int8_linear, lora_linear, lora_linear_reference
from fastft.ops.rms_norm import rms_norm, rms_norm_reference
from fastft.ops.rope import rope, rope_reference
from fastft.ops.swiglu import swiglu, swiglu_reference

__all__ = ["FusedCEOutput", "FusedLinearCrossEntropyLoss", "attention_reference", "causal_attention",
           "fused_linear_cross_entropy", "fused_linear_cross_entropy_reference", "int8_linear",
           "lora_linear", "lora_linear_reference", "rms_norm", "rms_norm_reference", "rope",
           "rope_reference", "swiglu", "swiglu_reference"]
