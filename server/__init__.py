"""Coordinator: the ServerApp that aggregates site updates and evaluates the global model.

Imports ``common`` only; never the hospitals' ``client`` package.
"""
