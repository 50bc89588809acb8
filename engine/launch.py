"""Several processes on this machine for one command, through torch.distributed's own launcher (the engine
torchrun runs on), without torchrun's traceback when a rank fails:

    python cli.py memorize --nproc-per-node 2 ...     # = torchrun --standalone --nproc-per-node 2 cli.py memorize ...

The caller checks the arguments once, in this process, before anything starts; then every rank runs the
same command line without --nproc-per-node, as `cli.py` under the same Python, with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set by the launcher (a local rendezvous on a free port, as
torchrun --standalone does). A rank that fails has printed its own `error:` line; launch() raises
RuntimeError with one line for the whole run, which cli.py prints and exits 2 on.
"""
from __future__ import annotations

import logging
import os
import sys
import uuid
from pathlib import Path

CLI = Path(__file__).resolve().parent.parent / "cli.py"


def launch(argv: list[str], nproc: int) -> None:
    """Run `cli.py *argv` in `nproc` processes and wait for all of them."""
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    os.environ.setdefault("OMP_NUM_THREADS", "1")      # as torchrun: N ranks on one host share its cores
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)   # the one line below says it
    try:
        elastic_launch(config, sys.executable)(str(CLI), *argv)
    except ChildFailedError as e:
        failed = sorted(f"rank {rank} (exit code {failure.exitcode})" for rank, failure in e.failures.items())
        raise RuntimeError(f"{len(failed)} of {nproc} processes failed: {', '.join(failed)}; their messages are "
                           "above") from None
