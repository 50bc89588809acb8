"""Several processes on this machine for one command, through torch.distributed's own launcher (the engine
torchrun runs on), without torchrun's traceback when a rank fails:

    python cli.py memorize --nproc-per-node 2 ...     # = torchrun --standalone --nproc-per-node 2 cli.py memorize ...

The caller checks the arguments once, in this process, before anything starts; then every rank runs the
same command line without --nproc-per-node, as `cli.py` under the same Python, with RANK, WORLD_SIZE,
LOCAL_RANK, MASTER_ADDR and MASTER_PORT set by the launcher (a local rendezvous on a free port, as
torchrun --standalone does). A failure stays one line: a rank's `error:` line goes through
report_error, which leaves it in a folder of the launcher's instead of printing it, and launch()
prints what they say: the one line that explains every failed rank (each said it, or was stopped by
the launcher once another had failed: the first to fail is not always rank 0); or each different
line once, naming its ranks, and a line naming the failed ranks. A launcher interrupted itself
(Ctrl-C, a scheduler's SIGTERM) says so in cli.py's one line, what the run kept and how to resume it:
an interrupted rank may have failed in a collective first. Under torchrun every rank prints its own.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import tempfile
import uuid
from pathlib import Path

CLI = Path(__file__).resolve().parent.parent / "cli.py"
ERRORS = "MEMORIZE_RANK_ERRORS"           # the launcher's folder of the ranks' error lines, in their environment


def report_error(line: str) -> None:
    """A command's one error line: printed, or under the engine's launcher left for it to print."""
    folder, rank = os.environ.get(ERRORS), os.environ.get("RANK")
    if folder and rank is not None:
        try:
            Path(folder, f"rank{rank}").write_text(line, encoding="utf-8")
            return
        except OSError:                    # the launcher is gone: say it here
            pass
    print(line, file=sys.stderr)


def launch(argv: list[str], nproc: int) -> None:
    """Run `cli.py *argv` in `nproc` processes and wait for all of them; a failure ends in SystemExit(2)
    once its lines are out."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0)
    os.environ.setdefault("OMP_NUM_THREADS", "1")      # as torchrun: N ranks on one host share its cores
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)   # the lines below say it
    with tempfile.TemporaryDirectory(prefix="rank-errors-") as folder:
        os.environ[ERRORS] = folder
        try:
            elastic_launch(config, sys.executable)(str(CLI), *argv)
            return
        except ChildFailedError as e:
            failures = {rank: failure.exitcode for rank, failure in e.failures.items()}
        except SignalException:            # this process was signalled (Ctrl-C, a scheduler's SIGTERM); the ranks stop
            failures = None
        finally:
            del os.environ[ERRORS]
        lines = {int(path.name[4:]): path.read_text(encoding="utf-8") for path in Path(folder).glob("rank*")}
    if failures is None:
        raise KeyboardInterrupt
    for line in failure_lines(lines, failures, nproc):
        print(line, file=sys.stderr)
    raise SystemExit(2)


def failure_lines(lines: dict[int, str], failures: dict[int, int], nproc: int) -> list[str]:
    """What the launcher prints once ranks failed (`failures`: rank -> exit code), given the error lines
    they left (`lines`: rank -> line): the one line that explains every failed rank (each said it, or was
    stopped by the launcher once another had failed); else each line once, naming its ranks, then a line
    naming the failed ranks."""
    told = list(dict.fromkeys(line for _, line in sorted(lines.items())))
    if len(told) == 1 and all(rank in lines or code == -signal.SIGTERM for rank, code in failures.items()):
        return told
    shown = []
    for line in told:
        ranks = [rank for rank, said in sorted(lines.items()) if said == line]
        shown.append(f"{line} (rank{'s' if len(ranks) > 1 else ''} {', '.join(map(str, ranks))})")
    failed = [f"rank {rank} (exit code {code})" for rank, code in sorted(failures.items())]
    return shown + [f"error: {len(failed)} of {nproc} processes failed: {', '.join(failed)}" +
                    ("; their messages are above" if lines else "")]
