"""The training side of fastft: the :class:`~fastft.train.recipe.Recipe` that owns a run's stages."""
from fastft.train.recipe import Recipe, seed_everything

__all__ = ["Recipe", "seed_everything"]
