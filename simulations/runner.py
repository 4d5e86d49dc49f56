"""Run the ServerApp and ClientApp on simulated hospitals with Flower's Ray simulation engine.

This does in-process what ``flwr run`` does in a simulation SuperLink's ``flwr-simulation``
process: it loads ``server.app:app`` and ``client.app:app`` from an app folder whose
``pyproject.toml`` holds the resolved run configuration, and drives them through
``flwr.simulation``'s engine. No SuperLink process is left behind, and Ray is shut down when
the run ends, unless the run is one of several inside :func:`shared_ray` (a sweep), which starts Ray once
for all of them and stops it when the last has ended.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from client.data import site_file
from common.config import RunConfig
from common.datasets import MedMNIST, Task, stratify_key
from common.errors import NothingAggregated
from common.flower_env import apply_flower_environment, keep_flower_logs_single
from common.io import atomic_write_bytes, owner_only_umask, private_dir
from simulations.partition import (
    Partition,
    PartitionSpec,
    ScannerProfile,
    apply_scanner,
    label_counts,
    partition,
)

SERVER_APP = "server.app:app"
CLIENT_APP = "client.app:app"
#: The research ClientApp with seeded DP randomness (``--reproducible``): see :mod:`simulations.reproducible`.
REPRODUCIBLE_CLIENT_APP = "simulations.reproducible:app"


def make_sites(data: MedMNIST, num_sites: int, spec: PartitionSpec, *, seed: int) -> Partition:
    """Partition the official train / val splits into sites (no file written)."""
    return partition(stratify_key(data.train.labels), stratify_key(data.val.labels), num_sites, spec, seed=seed)


def write_sites(
    data: MedMNIST, parts: Partition, profiles: list[ScannerProfile], site_dir: Path, *, seed: int
) -> list[dict[str, Any]]:
    """Write one ``site-NN.npz`` per hospital (scanner shift applied, owner-only) and return per-site stats."""
    private_dir(site_dir)
    info = data.info
    channels_last = info.spatial_dims == 2 and info.channels == 3
    train_key, val_key = stratify_key(data.train.labels), stratify_key(data.val.labels)
    n_cls = int(max(train_key.max(), val_key.max(initial=0))) + 1  # multi-label: +1 for "no finding"
    train_counts = label_counts(train_key, parts.train, n_cls)
    val_counts = label_counts(val_key, parts.val, n_cls)
    if info.task is Task.SEGMENTATION:  # volumes (patients) showing each class
        train_counts = volumes_per_class(data.train.labels, parts.train, len(info.labels))
        val_counts = volumes_per_class(data.val.labels, parts.val, len(info.labels))
    stats = []
    for site, (tr, va, prof) in enumerate(zip(parts.train, parts.val, profiles, strict=True)):
        buf = io.BytesIO()
        np.savez(
            buf,
            train_images=apply_scanner(data.train.images[tr], prof, channels_last=channels_last, seed=seed + site),
            train_labels=data.train.labels[tr],
            val_images=apply_scanner(data.val.images[va], prof, channels_last=channels_last, seed=seed + 10_000 + site),
            val_labels=data.val.labels[va],
        )
        atomic_write_bytes(site_file(site_dir, site), buf.getvalue())
        stats.append(
            {
                "site": f"site-{site}",
                "train": len(tr),
                "val": len(va),
                "train_per_label": train_counts[site].tolist(),
                "val_per_label": val_counts[site].tolist(),
                "scanner": prof.as_dict(),
            }
        )
    return stats


def volumes_per_class(masks: np.ndarray, parts: list[np.ndarray], num_labels: int) -> np.ndarray:
    """``(num_sites, num_labels)``: how many of each site's volumes contain foreground class 1 .. num_labels."""
    present = np.stack([(masks == c).reshape(len(masks), -1).any(axis=1) for c in range(1, num_labels + 1)], axis=1)
    return np.stack([present[p].sum(axis=0) for p in parts]).astype(np.int64)


def write_app_dir(app_dir: Path, config: RunConfig, *, client_app: str = CLIENT_APP) -> None:
    """A Flower app folder whose ``pyproject.toml`` carries this run's full configuration."""
    doc = {
        "project": {"name": "medsilo-run", "version": "1.0.0", "dependencies": []},
        "tool": {
            "flwr": {
                "app": {
                    "publisher": "medsilo",
                    "components": {"serverapp": SERVER_APP, "clientapp": client_app},
                    "config": config.to_flower(),
                }
            }
        },
    }
    atomic_write_bytes(app_dir / "pyproject.toml", tomli_w.dumps(doc).encode())


def actor_layout(*, sites: int, cpus: int, max_per_cpu: int = 3) -> tuple[int, float]:
    """How many Ray actors train the simulated sites, and the CPU share each one requests.

    Every actor trains one site at a time on one thread, and a round ends when its last site is done.
    One actor per core leaves cores idle whenever the sites do not divide evenly: 3 sites on 2 cores
    train in two waves, the second on one core while the other waits. Actors that time-share the cores
    finish together instead (3 actors on 2 cores: 1.5 site-trainings per round rather than 2).

    Returns the actor count ``A <= min(sites, max_per_cpu * cpus)`` that minimises a round's length in
    site-trainings, ``ceil(sites / A) * max(A, cpus) / cpus``, the fewest on a tie (each actor holds
    its own torch), and the ``num_cpus`` share per actor that makes Ray start exactly ``A`` of them
    (1.0, as before, when they do not outnumber the cores).
    """
    if sites < 1 or cpus < 1:
        raise ValueError(f"received sites={sites}, cpus={cpus}; both must be at least 1")

    def round_length(actors: int) -> float:
        return math.ceil(sites / actors) * max(actors, cpus) / cpus

    actors = min(range(1, min(sites, max_per_cpu * cpus) + 1), key=lambda a: (round_length(a), a))
    if actors <= cpus:
        return actors, 1.0
    return actors, cpus / (actors + 0.5)  # Flower starts int(cpus / share) actors: exactly ``actors``


def worker_pythonpath(search_path: list[str], inherited: str | None) -> str:
    """``PYTHONPATH`` that lets Ray's worker processes import what this process imports.

    Ray workers inherit the environment but not this interpreter's ``sys.path``; relative entries
    (``""`` is the working folder) are made absolute, and an inherited ``PYTHONPATH`` is kept after them.
    """
    entries = [os.path.abspath(p or os.curdir) for p in search_path]
    if inherited:
        entries.append(inherited)
    return os.pathsep.join(dict.fromkeys(entries))


#: The CPU count of the Ray instance :func:`shared_ray` keeps running across runs; ``None`` outside one.
_shared_cpus: int | None = None


@contextmanager
def ray_runtime(cpus: int) -> Iterator[None]:
    """Ray on loopback for the simulation engine, with no job-wide runtime environment; stopped on exit.

    Left to itself, Flower's Ray backend starts Ray with a runtime environment that only carries
    ``PYTHONPATH``. Ray then starts every actor's worker through its runtime-environment agent instead
    of handing it a worker it prestarted, about 1 s more per run on a 2-core machine. Putting the same
    ``PYTHONPATH`` in this process's environment gives the workers the path by inheritance; the backend
    finds Ray running and uses it (and shuts it down at the end of a run). On exit Ray is stopped if it
    still runs, a failed run included, and this process's ``PYTHONPATH`` is restored.

    Inside :func:`shared_ray` the Ray instance it started is used as it is and left running.
    """
    import ray

    if _shared_cpus is not None and ray.is_initialized():
        if cpus != _shared_cpus:
            raise ValueError(f"received cpus={cpus} inside a shared Ray session started with {_shared_cpus} CPUs; "
                             "pass the session's count")
        yield
        return
    inherited = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = worker_pythonpath(sys.path, inherited)
    try:
        ray.init(num_cpus=cpus, include_dashboard=False, logging_level=logging.ERROR)
        yield
    finally:
        if ray.is_initialized():
            ray.shutdown()
        os.environ.pop("PYTHONPATH", None)
        if inherited is not None:
            os.environ["PYTHONPATH"] = inherited


def _release_actors(backend: Any) -> None:
    """``RayBackend.terminate`` inside :func:`shared_ray`: stop this run's actors now and leave Ray running.

    Flower's own ``terminate`` asks each idle actor to exit and then shuts Ray down. Here every actor of the
    run's pool, idle or still holding a task (a failed run), is killed at once, so its worker process ends
    and its CPU share is free before the next run builds its pool.
    """
    import ray

    pool = backend.pool
    if pool is None:
        return
    for actor in [*pool.pool, *pool._future_to_actor.values()]:
        ray.kill(actor, no_restart=True)
    pool.pool.clear()
    pool._future_to_actor.clear()


@contextmanager
def shared_ray(cpus: int, flwr_home: Path) -> Iterator[None]:
    """One Ray instance for every :func:`run_federation` call inside the block (a sweep's runs); stopped on exit.

    Flower's Ray backend starts Ray only when it does not run (``ray.is_initialized()``), but its
    ``terminate`` ends every run with ``ray.shutdown()``. Inside the block that ``terminate`` kills the
    run's actors instead (:func:`_release_actors`) and :func:`ray_runtime` uses the running instance, so
    Ray's start and stop are paid once. Each run still gets new actors, whose worker processes import
    the ClientApp afresh, as in a run of its own. Ray starts under an owner-only umask, as in
    :func:`run_federation`, with Flower's environment applied first (``flwr_home``); on exit Ray is
    stopped (a failed run included) and Flower's ``terminate`` restored.
    """
    global _shared_cpus
    if _shared_cpus is not None:
        raise RuntimeError("a shared Ray session is already running in this process")
    apply_flower_environment(flwr_home)
    from flwr.server.superlink.fleet.vce.backend.raybackend import RayBackend

    flower_terminate = RayBackend.terminate
    with owner_only_umask(), ray_runtime(cpus):
        RayBackend.terminate = _release_actors  # type: ignore[method-assign,assignment]
        _shared_cpus = cpus
        try:
            yield
        finally:
            RayBackend.terminate = flower_terminate  # type: ignore[method-assign]
            _shared_cpus = None


def run_federation(config: RunConfig, *, num_sites: int, work_dir: Path, cpus: int | None = None,
                   reproducible: bool = False) -> dict[str, Any]:
    """Run the federation for ``config`` on ``num_sites`` simulated nodes; return ``federated.json``.

    ``config.out_dir`` receives the ServerApp's outputs and ``config.site_data_dir`` must hold
    the sites' files. The sites' DP mechanisms draw from the OS's entropy, as a hospital node's do, unless
    ``reproducible`` (research: seeded from ``config.seed``, see :mod:`simulations.reproducible`).

    The run, Ray and the apps included, is under an owner-only umask, as a deployed node's SuperNode and the
    coordinator's SuperLink are: what they write (audit logs, the sites' state folders, the run's outputs,
    Flower's home) is ``0600`` in ``0700`` folders.
    """
    with owner_only_umask():
        return _run_federation(config, num_sites=num_sites, work_dir=work_dir, cpus=cpus, reproducible=reproducible)


def _run_federation(config: RunConfig, *, num_sites: int, work_dir: Path, cpus: int | None,
                    reproducible: bool) -> dict[str, Any]:
    client_app = REPRODUCIBLE_CLIENT_APP if reproducible else CLIENT_APP
    apply_flower_environment(work_dir / "flwr-home")
    app_dir = work_dir / "flwr-app"
    write_app_dir(app_dir, config, client_app=client_app)
    # Flower and Ray are imported here, after the environment above is in place.
    from flwr.app import Context, RecordDict
    from flwr.common.constant import RUN_ID_NUM_BYTES, SUPERLINK_NODE_ID, TASK_ID_NUM_BYTES
    from flwr.server.superlink.linkstate.utils import generate_rand_int_from_bytes
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.constant import NOOP_FEDERATION_ID
    from flwr.supercore.run import Run
    from flwr.supercore.task_identity import TaskIdentity
    from flwr.supercore.telemetry import EventType

    keep_flower_logs_single()  # and plain text unless on a terminal

    cpus = cpus or os.cpu_count() or 1
    _, share = actor_layout(sites=num_sites, cpus=cpus)
    run = Run.create_empty(run_id=generate_rand_int_from_bytes(RUN_ID_NUM_BYTES))
    run.primary_task_id = generate_rand_int_from_bytes(TASK_ID_NUM_BYTES)
    run.federation_id = NOOP_FEDERATION_ID
    TaskIdentity.task_id = 1
    TaskIdentity.run_id = run.run_id
    TaskIdentity.node_id = SUPERLINK_NODE_ID
    context = Context(
        run_id=run.run_id, node_id=0, node_config={}, state=RecordDict(), run_config=config.to_flower()
    )
    backend_config: dict[str, Any] = {"client_resources": {"num_cpus": share, "num_gpus": 0.0}}
    with ray_runtime(cpus), suppress(NothingAggregated):  # federated.json says so: see the CLI
        _run_simulation(
            num_supernodes=num_sites,
            exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
            server_app_attr=SERVER_APP,
            client_app_attr=client_app,
            backend_config=backend_config,
            app_dir=str(app_dir),
            run=run,
            server_app_context=context,
            is_app=True,
        )
    result_path = Path(config.out_dir) / "federated.json"
    if not result_path.is_file():
        raise RuntimeError(f"the federation ended without writing {result_path}; see the log above")
    return json.loads(result_path.read_text())


def site_table(stats: list[dict[str, Any]], labels: tuple[str, ...]) -> str:
    """Per-site counts per label as a printable table."""
    names = [*labels, "(none)"] if stats and len(stats[0]["train_per_label"]) > len(labels) else list(labels)
    head = ["site", "train", "val", *[f"{n[:14]}" for n in names]]
    rows = [[s["site"], str(s["train"]), str(s["val"]), *[str(c) for c in s["train_per_label"]]] for s in stats]
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    fmt = "  ".join(f"{{:>{w}}}" for w in widths)
    return "\n".join(fmt.format(*r) for r in [head, *rows])

