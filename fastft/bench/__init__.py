"""``fastft bench``: fastft against stock Hugging Face on the same model, data, seeds and settings.

:mod:`~fastft.bench.cli` is the command (it starts one child process per side and round),
:mod:`~fastft.bench.runners` the sides, :mod:`~fastft.bench.data` the workloads,
:mod:`~fastft.bench.model` the model folders, :mod:`~fastft.bench.report` the ratios, MFU and
targets, :mod:`~fastft.bench.packing` packed vs unpacked training on fastft's fast path.
"""
