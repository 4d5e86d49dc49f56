"""Code shared by hospital nodes and the coordinator.

Nothing in this package imports ``client`` or ``server``: both sides import it.
"""
