"""Recipes: whole experiments kept in ``recipes/*.yaml`` and chosen with ``recipe=NAME``.

Hydra searches config groups only under ``configs/``. Storing each recipe file in Hydra's
ConfigStore as group ``recipe`` with package ``_global_`` makes the top-level ``recipes/`` folder a
group too, so a recipe may override other groups (``override /model: bert``) and ``recipe=nope``
fails with the list of recipes there are. The store must be filled before ``@hydra.main`` composes.
"""

from __future__ import annotations

from pathlib import Path

from hydra.core.config_store import ConfigStore
from omegaconf import OmegaConf

GROUP = "recipe"


def register_recipes(directory: str | Path) -> list[str]:
    """Stores every ``*.yaml`` of ``directory`` as an option of the ``recipe`` group; returns their names."""
    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"hetrain: recipe folder {directory} does not exist")
    store = ConfigStore.instance()
    names = []
    for path in sorted(directory.glob("*.yaml")):
        store.store(group=GROUP, name=path.stem, node=OmegaConf.load(path), package="_global_")
        names.append(path.stem)
    return names
