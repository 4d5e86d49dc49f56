"""A research ClientApp whose DP mechanisms draw from seeded generators: bit-for-bit reruns of a simulation.

The node's own ClientApp (:mod:`client.app`) always draws from the operating system's entropy; only
``medsilo simulate --reproducible`` runs this one, and the run's ``summary.json`` and report say so. Its
noise is predictable from the run config, so its ε holds against nobody who knows the seed: research only.
It refuses to serve a node that Flower's simulation engine did not start (one without ``partition-id`` and
``num-partitions`` in its node config), so a deployed SuperNode never runs it by accident; an app bundle that
names it on purpose is the coordinator shipping code, which the hospital's approval of app code must stop.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.client import Client, ClientApp

from client.app import audit_mod, secure_aggregation_mod
from common.errors import DataError


def client_fn(context: Context) -> Client:
    """A :class:`client.site.SiteClient` with :func:`client.dp.rng.reproducible` randomness."""
    from client.dp.rng import reproducible
    from client.site import SiteClient
    from common import recipes

    node = context.node_config
    if "partition-id" not in node or "num-partitions" not in node:
        raise DataError("the reproducible research ClientApp runs only inside `medsilo simulate --reproducible`; "
                        "a hospital node runs client.app:app")
    config = recipes.from_flower(context.run_config)
    return SiteClient(context, randomness=reproducible(seed=config.seed, site=int(node["partition-id"]))).to_client()


#: The research ClientApp (same mods as the node's).
app = ClientApp(client_fn=client_fn, mods=[audit_mod, secure_aggregation_mod])
