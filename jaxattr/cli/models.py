"""`jaxattr models`: the registered models and where their weights are."""

from __future__ import annotations

import argparse

from jaxattr.cli._common import format_table
from jaxattr.models import list_models, model_info
from jaxattr.models.registry import ModelInfo, cache_path, local_weights_file


def add_parser(commands) -> None:
    models = commands.add_parser("models", help="list the registered models and their weights", allow_abbrev=False)
    models.set_defaults(run=run, parser=models)


def weights_status(info: ModelInfo) -> str:
    """'cached' (converted or torch weights on this machine), 'embedded' (shipped in a package)
    or 'missing' (create_model would download them). Checked in create_model's order."""
    if cache_path(info.name).is_file():
        return "cached"
    if info.embedded is not None:
        return "embedded"
    return "cached" if local_weights_file(info) is not None else "missing"


def run(args: argparse.Namespace) -> int:
    rows = []
    for name in list_models():
        info = model_info(name)
        size = f"{info.image_size} (resize {info.resize_size}, {info.interpolation})"
        rows.append((name, info.family, info.source, size, weights_status(info)))
    print(format_table(("model", "family", "source", "input", "weights"), rows))
    return 0
