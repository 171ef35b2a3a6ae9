"""``fastft search``: hyperparameter search over a ``fastft train`` config, on Optuna.

``fastft.search.run(config, space, ...)`` returns the Optuna study; the command line is
``fastft search CONFIG.yaml --space SPACE.yaml`` (fastft/search/cli.py). Pieces: the space file
(space.py), storage and resume (storage.py), the model loaded once (reuse.py), one trial
(objective.py), the outputs (outputs.py), the loop (driver.py).
"""
from fastft.search.driver import run

__all__ = ["run"]
