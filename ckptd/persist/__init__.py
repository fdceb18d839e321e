"""Persistence above the stores: tiers, upload and download, the commit protocol, retention, leases.

Nothing here imports torch, so the daemon can use the uploader; ``store/``
below knows nothing of snapshots.
"""
