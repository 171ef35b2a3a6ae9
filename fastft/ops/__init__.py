"""Fused ops, importable on their own. Each op module holds its pure-PyTorch reference
(the fallback and test oracle), its autograd.Function and the single backend choice."""
