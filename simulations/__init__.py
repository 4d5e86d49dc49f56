"""Research tooling: simulated hospital federations on one machine.

Composes ``client`` (the hospitals' ClientApp) and ``server`` (the coordinator's ServerApp)
with Flower's Ray-based simulation engine, and adds partitioners, reference trainings
(pooled and local-only) and reports.
"""
