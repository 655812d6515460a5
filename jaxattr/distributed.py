"""Several hosts (a TPU pod slice, a multi-GPU SLURM or Kubernetes job): one process per host,
JAX's own multi-controller runtime (`jax.distributed`), each process explaining its own shard of
the inputs on all of its local devices.

Design. Attribution is embarrassingly parallel: no image's map depends on another's, so a global
SPMD program over every host's devices (global arrays built with
`jax.make_array_from_process_local_data`) would buy no arithmetic, and would cost what a pod user
cares about most: every process would step in lockstep (a slow or failing host stalls all, each
process must run the same number of batches, padded with dummy work when shards differ or some are
already done), and a killed process would kill the step for everyone. Here instead:
  * `jax.distributed.initialize` gives each process its index and the process count (coordinator
    address, count and index from arguments, or, when omitted, from the environment as JAX reads it
    on Cloud TPU pods, SLURM, Open MPI and Kubernetes);
  * `shard` splits the inputs deterministically and disjointly: the sorted output names, dealt
    round-robin (balanced to one image; every process lists the same inputs and derives the same
    names, so no communication is needed to agree on it);
  * each process runs the ordinary batch loop on its shard, data parallel over its local devices
    (`jax.local_devices()`), writing into the shared output directory: outputs have distinct
    names, and every process merges its records into the one summary under the directory's lock;
  * `barrier` synchronises the processes twice: after each has cleared what killed runs left in the
    directory (so no process deletes a temporary file another is writing), and at the end, so that
    process 0 reports when every shard is done. These are the only collectives.
A killed process's shard is completed by running the job again: every shard resumes (finished
images are skipped), and the processes whose shards were done only meet at the barriers. The
output directory must be shared by the hosts (NFS, Filestore, Lustre) and support `flock` for the
summary (a file system without it merges the summary unlocked, with a warning).
"""

from __future__ import annotations

import errno
import json
import socket
import threading
from typing import Callable, Sequence, TypeVar

import jax
import jax._src.distributed  # the runtime's key-value store: how the processes compare their settings

Item = TypeVar("Item")


class DistributedError(Exception):
    """The multi-process runtime could not start (coordinator unreachable, inconsistent counts)."""


def initialize(
    coordinator: str | None = None,
    num_processes: int | None = None,
    process_id: int | None = None,
    *,
    timeout: int = 300,
    on_timeout: Callable[[str], None] | None = None,
) -> tuple[int, int]:
    """Start JAX's multi-controller runtime; returns (this process's index, process count).

    Arguments left None are read from the environment by `jax.distributed.initialize` (Cloud TPU,
    SLURM, Open MPI, Kubernetes). Inconsistent arguments raise DistributedError. When not every
    process connects within `timeout` seconds (a coordinator nobody runs, a process missing),
    JAX's runtime aborts the process (a fatal error in C++, not an exception); with `on_timeout`,
    that is called instead, from a watchdog thread, shortly before JAX would abort (the command
    line prints one line and exits)."""
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"the process count must be at least 1, got {num_processes}")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"process id {process_id} is not in [0, {num_processes - 1}] for {num_processes} processes")
    where = f"the coordinator {coordinator}" if coordinator else "the coordinator named by the environment"
    if coordinator and process_id == 0:
        # Process 0 runs the coordinator; jaxlib crashes (SIGSEGV) when its port is taken.
        port = int(coordinator.rpartition(":")[2])
        problem = port_in_use(port)
        if problem:
            raise DistributedError(f"cannot start the distributed run with {where}: port {port} is {problem}; choose another port")
    watchdog = None
    if on_timeout is not None:
        message = (
            f"cannot start the distributed run with {where}: not every process connected within {timeout} s "
            "(is the coordinator's process running, is every process started with the same process count?)"
        )
        watchdog = threading.Timer(timeout, on_timeout, [message])
        watchdog.daemon = True
        watchdog.start()
    try:
        jax.distributed.initialize(
            coordinator_address=coordinator,
            num_processes=num_processes,
            process_id=process_id,
            # JAX's own deadline: later than the watchdog's, which then speaks first.
            initialization_timeout=timeout + (_WATCHDOG_LEAD if watchdog else 0),
        )
    except Exception as e:  # jaxlib raises plain RuntimeErrors/ValueErrors (XlaRuntimeError among them)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise DistributedError(f"cannot start the distributed run with {where}: {first}") from None
    finally:
        if watchdog is not None:
            watchdog.cancel()
    _check_agreement(num_processes, process_id, timeout)
    return jax.process_index(), jax.process_count()


def port_in_use(port: int) -> str | None:
    """Why the coordinator cannot listen on `port` on every address ("in use by another program",
    ...), None if it can; the port is free again when this returns."""
    for family, address in ((socket.AF_INET6, "::"), (socket.AF_INET, "0.0.0.0")):
        try:
            with socket.socket(family, socket.SOCK_STREAM) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a closed connection's TIME_WAIT is no obstacle
                probe.bind((address, port))
                return None
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                return "in use by another program"
            if e.errno in (errno.EACCES, errno.EPERM):
                return "reserved (permission denied)"
            continue  # no IPv6 on this host: try IPv4
    return "not available"


def _check_agreement(num_processes: int | None, process_id: int | None, timeout: int) -> None:
    """Every process of the job was started with the process count the runtime has, and runs
    under the index it asked for; otherwise DistributedError, in every process: each publishes
    what it asked for in the coordinator's key-value store and reads what the others asked for
    (a process started with --num-processes 3 beside two started with 2 would otherwise join
    as one of 2)."""
    index, count = jax.process_index(), jax.process_count()
    mine = {"index": index, "num_processes": num_processes, "process_id": process_id}
    problems = []
    if num_processes is not None and num_processes != count:
        problems.append(f"this process was started with --num-processes {num_processes}, the job has {count} processes")
    if process_id is not None and process_id != index:
        problems.append(f"this process asked for --process-id {process_id} and was given {index}")
    client = getattr(getattr(jax._src.distributed, "global_state", None), "client", None)  # noqa: SLF001
    if count > 1 and client is not None:
        client.key_value_set(f"jaxattr/agreement/{index}", json.dumps(mine))
        for other in range(count):
            if other == index:
                continue
            try:
                theirs = json.loads(client.blocking_key_value_get(f"jaxattr/agreement/{other}", timeout * 1000))
            except Exception:  # jaxlib's errors: the process never reached this point in time
                problems.append(f"process {other} did not report its settings within {timeout} s")
                continue
            if theirs.get("num_processes") not in (None, count):
                problems.append(f"process {other} was started with --num-processes {theirs['num_processes']}, the job has {count}")
            if theirs.get("process_id") not in (None, other):
                problems.append(f"process {other} asked for --process-id {theirs['process_id']}")
    if problems:
        raise DistributedError(f"the processes disagree: {problems[0]}; start every process with the same --num-processes and a distinct --process-id")


_WATCHDOG_LEAD = 30  # seconds


def shard(names: Sequence[Item], index: int, count: int) -> list[Item]:
    """Process `index`'s share of `names` (any sortable keys, e.g. output names): the sorted
    names dealt round-robin over `count` processes, so shards are disjoint, cover every name, and
    differ in size by one at most."""
    if not 0 <= index < count:
        raise ValueError(f"process index {index} is not in [0, {count - 1}]")
    return sorted(names)[index::count]


def barrier(name: str) -> None:
    """Wait until every process has reached the barrier `name` (a no-op in a single process)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
