"""Restore: find, verify and load snapshots (torch is imported only by ``load``)."""
