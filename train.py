"""Trains a hetrain experiment: configs/ composed by Hydra, plus a recipe from recipes/.

    python train.py recipe=bert_split                         # one run, written to outputs/<date>/<H-M-S-us>/
    python train.py recipe=bert_split --cfg job               # print the composed config and stop
    python train.py recipe=bert_split trainer.max_steps=50 model.hidden=64 seed=1
    python train.py -m recipe=bert_split trainer.max_steps=20 model.hidden=64,128   # sweep, to multirun/...

Every run leaves summary.md and summary.json in its run directory; a sweep adds summary.csv and
summary.md, one row per job, in its multirun directory.
"""

from pathlib import Path

import hydra
from omegaconf import DictConfig

from hetrain.recipes import register_recipes
from hetrain.train import run

register_recipes(Path(__file__).resolve().parent / "recipes")


@hydra.main(config_path="configs", config_name="train", version_base="1.3")
def main(cfg: DictConfig) -> float | None:
    return run(cfg)


if __name__ == "__main__":
    main()
