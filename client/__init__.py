"""Hospital node: the ClientApp that trains on a site's own images with DP-SGD.

Imports ``common`` only; never the coordinator's ``server`` package.
"""
