"""Snapshot data path: capture, stage, write, manifest (the format)."""
