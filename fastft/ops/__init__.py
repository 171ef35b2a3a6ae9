"""Fused ops, importable on their own. Each op module holds its pure-PyTorch reference
(the fallback and test oracle), its autograd.Function and the single backend choice."""

# Lazy exports: importing fastft.ops stays cheap; the op module loads on first use.
# The function itself is imported from its module (`from fastft.ops.fused_linear_cross_entropy
# import fused_linear_cross_entropy`): a package attribute of the same name as the submodule would
# be replaced by the module as soon as the submodule is imported.
_LAZY = {
    "FusedLinearCrossEntropyLoss": "fastft.ops.fused_linear_cross_entropy",
}


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastft.ops' has no attribute {name!r}")
