"""Where tile tasks run: local threads, a ``LocalCluster`` made for the run, or an existing dask scheduler."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from ._logging import logger
from ._tiles import active_client


@contextmanager
def dask_client(
    n_workers: int | None = None,
    *,
    scheduler: str | None = None,
    memory_limit: str | float | None = "auto",
    threads_per_worker: int = 1,
) -> Iterator[Any]:
    """A ``dask.distributed`` client for the duration of a run, or ``None`` for local threads.

    Parameters
    ----------
    n_workers
        Start a ``LocalCluster`` of this many worker processes (closed at the end). ``None`` or ``0``: use the
        active client if there is one (e.g. made by the user), otherwise local threads.
    scheduler
        Address of a running scheduler (``"tcp://host:8786"``, or a ``dask-jobqueue`` cluster's
        ``scheduler_address``); its workers must see the input and output folders.
    memory_limit
        Memory limit of each local worker (``"4GiB"``, bytes, ``"auto"``: the machine's memory shared equally).
    threads_per_worker
        Threads of each local worker.
    """
    if scheduler is not None and n_workers:
        raise ValueError("Give either a number of local workers or a scheduler address, not both.")
    if n_workers is not None and n_workers < 0:
        raise ValueError(f"`n_workers` must be 0 or more, got {n_workers}.")
    if scheduler is None and not n_workers:
        client = active_client()
        if client is not None:
            logger.info(f"Running tiles on the active dask client ({client.scheduler.address})")
        yield client
        return
    from distributed import Client, LocalCluster

    cluster = None
    if scheduler is not None:
        client = Client(scheduler)
        logger.info(f"Connected to the dask scheduler {scheduler} ({len(client.scheduler_info()['workers'])} workers)")
    else:
        cluster = LocalCluster(
            n_workers=n_workers,
            threads_per_worker=threads_per_worker,
            processes=True,
            memory_limit=memory_limit,
            dashboard_address=None,
        )
        client = Client(cluster)
        logger.info(f"Started a local dask cluster of {n_workers} worker(s), memory limit {memory_limit} each")
    try:
        with client.as_current():
            yield client
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
