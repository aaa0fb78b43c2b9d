"""Every recipe composes and its parts instantiate; recipe selection and --cfg job behave as documented."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from hetrain.callbacks.placement import StagePlacement
from hetrain.recipes import register_recipes
from hetrain.train import build

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))


def compose_train(*overrides: str, output_dir: Path):
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        return compose("train", overrides=[*overrides, f"output_dir={output_dir}"])


def train_py(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs train.py as a user would: the Triton interpreter the test session turns on stays off."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", autouse=True)
def recipes_registered():
    assert register_recipes(ROOT / "recipes") == RECIPES


def test_there_are_recipes():
    assert "bert_split" in RECIPES


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_composes_and_instantiates(name, tmp_path):
    cfg = compose_train(f"recipe={name}", "data.train_size=64", "data.val_size=16", output_dir=tmp_path)
    OmegaConf.resolve(cfg)

    parts = build(cfg)
    assert isinstance(parts.callbacks["placement"], StagePlacement)
    assert set(cfg.backends) == {"pins", "prefer", "strict"}
    assert parts.trainer.max_steps == cfg.trainer.max_steps
    datamodule, task = parts.datamodule, parts.task

    # The parts fit together: a batch of the recipe's data goes through the recipe's model.
    datamodule.setup("fit")
    batch = next(iter(datamodule.val_dataloader()))
    with torch.no_grad():
        logits = task(*task.model_inputs(batch))
    assert logits.shape == (len(batch["labels"]), cfg.data.num_classes)


def test_bert_split_places_stages(tmp_path):
    cfg = compose_train("recipe=bert_split", output_dir=tmp_path)
    assert OmegaConf.to_container(cfg.placement.plan) == {
        "embeddings": "cpu", "encoder": "cuda", "classifier": "cuda"
    }


def test_recipe_overrides_groups_and_wins_over_primary(tmp_path):
    recipes = tmp_path / "recipes"
    recipes.mkdir()
    (recipes / "probe_override.yaml").write_text(
        "defaults:\n  - override /trainer: cpu\nseed: 7\nmodel:\n  hidden: 32\n"
    )
    register_recipes(recipes)
    cfg = compose_train("recipe=probe_override", output_dir=tmp_path)
    assert cfg.trainer.accelerator == "cpu"
    assert cfg.seed == 7 and cfg.data.seed == 7
    assert cfg.model.hidden == 32


def test_command_line_wins_over_recipe(tmp_path):
    cfg = compose_train("recipe=bert_split", "trainer.max_steps=7", "model.hidden=64", output_dir=tmp_path)
    assert cfg.trainer.max_steps == 7 and cfg.model.hidden == 64


def test_unknown_recipe_lists_the_recipes(tmp_path):
    result = train_py("recipe=does_not_exist", cwd=tmp_path)
    assert result.returncode != 0
    assert "Could not find 'recipe/does_not_exist'" in result.stderr
    listing = result.stderr.split("Available options in 'recipe':", 1)[1]
    for name in RECIPES:
        assert name in listing
    assert not (tmp_path / "outputs").exists()


def test_cfg_job_prints_composed_config(tmp_path):
    result = train_py("recipe=bert_split", "model.hidden=64", "--cfg", "job", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    cfg = OmegaConf.create(result.stdout)
    assert cfg.model._target_ == "hetrain.models.bert.BertClassifier"
    assert cfg.model.hidden == 64
    assert cfg.placement.plan.encoder == "cuda"
    assert "hydra" not in cfg
    assert not (tmp_path / "outputs").exists()
