"""The ``ckptd`` command line: parses and renders; the work is in the package.

Imports of torch-heavy parts happen inside commands, so ``ckptd ls`` and
``ckptd --help`` start fast.
"""

from __future__ import annotations

import click


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="ckptd")
def main() -> None:
    """ckptd: asynchronous training snapshots, object storage and restore."""
