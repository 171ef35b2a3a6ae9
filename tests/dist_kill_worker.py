"""``fastft train`` on one rank of a 2-process job, with a test-only hook that stalls rank 1
inside the DCP save of one step, so tests/test_distributed.py can ``kill -9`` the job while
that save is really in progress (not a simulated half folder).

    python tests/dist_kill_worker.py MARKER STEP fastft-train-args...   (RANK/WORLD_SIZE set)

Rank 1 wraps DCP's file writer (``_FileSystemWriter.write_data``, what ``dcp.save`` calls to
write a rank's shard file): in the save of step STEP (path ``.step-<STEP>.*``), once its
own shard file is on disk it writes MARKER (the files of that folder, one per line) and blocks
forever. Rank 0 then waits inside ``dcp.save`` for rank 1's write results (and never writes
the checkpoint's ``.metadata``); the test SIGKILLs both ranks. Production code gets no hook:
the wrapper lives here only.
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path


def install_stall(marker: Path, step: int) -> None:
    from torch.distributed.checkpoint import filesystem

    original = filesystem._FileSystemWriter.write_data

    def write_data(self, plan, planner):
        fut = original(self, plan, planner)
        if f"step-{step:06d}" in str(self.path):  # its temporary folder (or, were the save not
            # atomic, the checkpoint folder itself)
            fut.wait()  # this rank's shard file is written
            files = sorted(str(p.relative_to(Path(self.path).parent.parent)) for p in
                           Path(self.path).parent.rglob("*") if p.is_file())
            tmp = marker.with_suffix(".tmp")
            tmp.write_text("".join(f + "\n" for f in files))
            os.replace(tmp, marker)  # the test never reads half a list
            while True:  # mid-save until SIGKILL
                time.sleep(60)
        return fut

    filesystem._FileSystemWriter.write_data = write_data


def main(argv: list[str]) -> None:
    marker, step, args = Path(argv[0]), int(argv[1]), argv[2:]
    if os.environ.get("RANK") == "1":
        install_stall(marker, step)
    from fastft.cli import main as cli_main

    cli_main(["train", *args])


if __name__ == "__main__":
    main(sys.argv[1:])
