"""The training side of fastft: the :class:`~fastft.train.recipe.Recipe` that owns a run's stages
(``recipe.py``), the loop (``trainer.py``; optimizer and lr schedule in ``utils.py``, fine-tuning
modes in ``finetune.py``, the dtype policy in ``precision.py``, ``checkpoint.py``,
``distributed.py`` and ``dist_checkpoint.py`` for torchrun), the one evaluation loop
(``evaluation.py``) and the commands ``fastft train`` (``cli.py``), ``fastft eval``
(``eval_cli.py``) and ``fastft plot`` (``plot.py``).

``Recipe`` and ``seed_everything`` are exported lazily: ``fastft.train.trainer`` imports
``fastft.train.evaluation``, and the recipe (above the trainer) must not load with it.
"""

_LAZY = {"Recipe": "fastft.train.recipe", "seed_everything": "fastft.train.recipe"}
__all__ = list(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'fastft.train' has no attribute {name!r}")
