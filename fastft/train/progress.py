"""Progress bar for the training loop: loss, lr, tokens/s and ETA (tqdm when present)."""
from __future__ import annotations

import sys


class Progress:
    def __init__(self, total: int, initial: int = 0, enabled: bool = True):
        self.bar = None
        if not enabled:
            return
        try:
            from tqdm.auto import tqdm
        except ImportError:  # pragma: no cover - tqdm comes with transformers
            return
        self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True, file=sys.stderr,
                        bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]")

    def update(self, rec: dict) -> None:
        if self.bar is None:
            return
        self.bar.set_postfix_str(f"loss {rec['loss']:.4f}, lr {rec['lr']:.2e}, {rec['tokens_per_s']:.0f} tok/s",
                                 refresh=False)
        self.bar.update(1)

    def note(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
