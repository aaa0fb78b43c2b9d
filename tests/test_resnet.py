"""The ResNet with a fused stem, its synthetic images, and the resnet_fused_amp recipe end to end."""

import json
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from op_testing import non_contiguous, randn

import hetrain.nn
from hetrain import plugins
from hetrain.callbacks.precision import choose_precision
from hetrain.data.images import SyntheticImageDataModule, SyntheticImages
from hetrain.models.resnet import ResNet
from hetrain.models.task import ClassificationTask
from hetrain.recipes import register_recipes
from hetrain.train import run

ROOT = Path(__file__).resolve().parent.parent
SMALL = {"num_classes": 5, "widths": (8, 12, 16), "blocks": (1, 2, 1), "zero_init_residual": False}
GRAD_TOLERANCE = {torch.float32: (2e-4, 2e-4), torch.float64: (1e-9, 1e-9)}


def _randomise_norms(model: ResNet, seed: int) -> None:
    """Off-default BatchNorm scales, shifts and running statistics, so every term of the stem's epilogue shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                c = m.num_features
                m.weight.copy_(0.5 + torch.rand(c, generator=g))
                m.bias.copy_(torch.randn(c, generator=g) * 0.2)
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.3)
                m.running_var.copy_(0.5 + torch.rand(c, generator=g))


def _pair(dtype: torch.dtype, channels_last: bool) -> tuple[ResNet, ResNet]:
    torch.manual_seed(0)
    fused = ResNet(fused=True, channels_last=channels_last, **SMALL).to(dtype)
    _randomise_norms(fused, seed=1)
    plain = ResNet(fused=False, channels_last=channels_last, **SMALL).to(dtype)
    assert fused.state_dict().keys() == plain.state_dict().keys()
    plain.load_state_dict(fused.state_dict())
    return fused, plain


# --- model --------------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["cpu", "torch"])
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("training", [True, False])
def test_fused_and_unfused_agree_in_outputs_gradients_and_running_stats(backend, channels_last, dtype, training):
    fused, plain = _pair(dtype, channels_last)
    assert isinstance(fused.stem, hetrain.nn.ConvBNReLUPool2d)
    assert not isinstance(plain.stem, hetrain.nn.ConvBNReLUPool2d)
    fused.train(training)
    plain.train(training)
    # Odd sizes, not contiguous in any layout.
    images = non_contiguous(randn(3, 3, 29, 23, dtype=dtype, seed=2, shift=0.3))
    with plugins.use_backend(bn_relu_pool=backend):
        out_f = fused(images)
        out_p = plain(images)
        atol, rtol = GRAD_TOLERANCE[dtype]
        torch.testing.assert_close(out_f, out_p, atol=atol, rtol=rtol)
        upstream = randn(*out_f.shape, dtype=dtype, seed=3)
        (out_f * upstream).sum().backward()
        (out_p * upstream).sum().backward()
    for (name, pf), pp in zip(fused.named_parameters(), plain.parameters(), strict=True):
        assert pf.grad is not None and pf.grad.abs().sum() > 0, name
        torch.testing.assert_close(pf.grad, pp.grad, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    for (name, bf), bp in zip(fused.named_buffers(), plain.buffers(), strict=True):
        torch.testing.assert_close(bf, bp, atol=atol, rtol=rtol, msg=lambda m, n=name: f"{n}: {m}")
    assert int(fused.stem[1].num_batches_tracked) == int(training)


def test_state_dict_moves_from_unfused_to_fused():
    torch.manual_seed(0)
    plain = ResNet(fused=False, **SMALL)
    _randomise_norms(plain, seed=4)
    fused = ResNet(fused=True, **SMALL)
    fused.load_state_dict(plain.state_dict())
    for (name, a), b in zip(fused.state_dict().items(), plain.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    fused.eval()
    plain.eval()
    images = randn(2, 3, 32, 32, seed=5)
    with torch.no_grad():
        torch.testing.assert_close(fused(images), plain(images), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("training", [True, False])
def test_fused_and_unfused_agree_under_bf16_autocast(training):
    fused, plain = _pair(torch.float32, channels_last=True)
    fused.train(training)
    plain.train(training)
    images = randn(4, 3, 32, 32, seed=6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out_f, out_p = fused(images), plain(images)
    assert out_f.dtype == out_p.dtype == torch.bfloat16
    torch.testing.assert_close(out_f.float(), out_p.float(), atol=5e-2, rtol=5e-2)


def test_stages_run_stage_and_micro_batches_give_the_forward():
    torch.manual_seed(0)
    model = ResNet(**SMALL).eval()  # eval: BatchNorm uses running statistics, so micro-batches change nothing
    stages = model.stages()
    assert list(stages) == ["stem", "layer1", "layer2", "layer3", "head"]
    assert all(model.get_submodule(name) is stage for name, stage in stages.items())
    in_stages = sum(p.numel() for stage in stages.values() for p in stage.parameters())
    assert in_stages == sum(p.numel() for p in model.parameters())

    images = randn(5, 3, 32, 32, seed=7)
    with torch.no_grad():
        whole = model(images)
        x = images
        for name in stages:
            x = model.run_stage(name, x, images)
        torch.testing.assert_close(x, whole)
        model.micro_batches = 2
        torch.testing.assert_close(model(images), whole, atol=1e-5, rtol=1e-5)
    assert whole.shape == (5, SMALL["num_classes"])


def test_channels_last_keeps_weights_and_activations_nhwc():
    model = ResNet(**SMALL)
    assert model.stem[0].weight.is_contiguous(memory_format=torch.channels_last)
    images = randn(2, 3, 32, 32, seed=8)  # NCHW, as a DataLoader gives them
    stem_out = model.run_stage("stem", images, images)
    assert stem_out.is_contiguous(memory_format=torch.channels_last) and not stem_out.is_contiguous()
    plain_layout = ResNet(channels_last=False, **SMALL)
    assert plain_layout.run_stage("stem", images, images).is_contiguous()


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="one block count per stage width"):
        ResNet(widths=(8, 16), blocks=(1,))
    with pytest.raises(ValueError, match="num_classes >= 2"):
        ResNet(num_classes=1)
    with pytest.raises(ValueError, match=r"expects images of shape \(B, 3, H, W\), got \(2, 1, 32, 32\)"):
        ResNet(**SMALL)(randn(2, 1, 32, 32, seed=9))


def test_task_feeds_images_and_names_missing_keys():
    task = ClassificationTask(ResNet(**SMALL), num_classes=SMALL["num_classes"])
    batch = {"images": randn(4, 3, 32, 32, seed=10), "labels": torch.tensor([0, 1, 2, 3]),
             "extra": torch.zeros(4)}
    moved = task.transfer_batch_to_device(batch, torch.device("cpu"), 0)
    assert set(moved) == {"images", "labels", "extra"}  # every entry reaches training_step and the callbacks
    make_input, stage_args = task.placement_inputs(batch)
    assert make_input() is batch["images"] and stage_args("stem") == () and stage_args("layer2") == ()
    loss, logits = task._loss(moved)
    assert logits.shape == (4, SMALL["num_classes"]) and loss.isfinite()
    with pytest.raises(KeyError, match=r"ResNet takes \['images'\] but the batch has no \['images'\]"):
        task._loss({"input_ids": torch.zeros(4, 3, dtype=torch.long), "labels": batch["labels"]})


# --- data ---------------------------------------------------------------------------------------

def test_images_are_deterministic_balanced_and_seed_dependent():
    a = SyntheticImages(103, num_classes=7, image_size=16, seed=3)
    b = SyntheticImages(103, num_classes=7, image_size=16, seed=3)
    c = SyntheticImages(103, num_classes=7, image_size=16, seed=4)
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)
    assert not torch.equal(a.images, c.images) and not torch.equal(a.labels, c.labels)
    counts = torch.bincount(a.labels, minlength=7)
    assert int(counts.max() - counts.min()) <= 1 and int(counts.sum()) == 103
    assert a.images.shape == (103, 3, 16, 16) and a.images.dtype == torch.float32
    assert 0.5 < float(a.images.var()) < 3  # signal of about unit variance plus the noise
    item = a[5]
    assert torch.equal(item["images"], a.images[5]) and int(item["labels"]) == int(a.labels[5])


def test_images_carry_their_class_orientation():
    # Without noise, the class is the grating's orientation: the direction of strongest change.
    data = SyntheticImages(60, num_classes=6, image_size=32, noise=0.0, seed=0)
    dx = data.images.diff(dim=3).pow(2).sum((1, 2, 3))
    dy = data.images.diff(dim=2).pow(2).sum((1, 2, 3))
    # Class 0 varies along x only; class num_classes/2 (90 degrees) along y only.
    assert (dx[data.labels == 0] > 10 * dy[data.labels == 0]).all()
    assert (dy[data.labels == 3] > 10 * dx[data.labels == 3]).all()


def test_datamodule_batches_splits_and_shuffling():
    kwargs = {"num_classes": 4, "image_size": 16, "train_size": 40, "val_size": 12, "batch_size": 8, "seed": 5}
    dm, again = SyntheticImageDataModule(**kwargs), SyntheticImageDataModule(**kwargs)
    dm.setup("fit")
    again.setup("fit")
    assert not torch.equal(dm.train_set.images[:12], dm.val_set.images)  # val drawn from seed + 1
    first = next(iter(dm.train_dataloader()))
    assert set(first) == {"images", "labels"}
    assert first["images"].shape == (8, 3, 16, 16) and first["labels"].shape == (8,)
    assert torch.equal(first["images"], next(iter(again.train_dataloader()))["images"])
    assert len(dm.train_dataloader()) == 5 and len(dm.val_dataloader()) == 2
    val = torch.cat([b["labels"] for b in dm.val_dataloader()])
    assert torch.equal(val, dm.val_set.labels)  # validation in order, every image once
    assert dm.train_dataloader().pin_memory == torch.cuda.is_available()


# --- the recipe ---------------------------------------------------------------------------------

def test_resnet_fused_amp_recipe_trains(tmp_path):
    register_recipes(ROOT / "recipes")
    overrides = ["recipe=resnet_fused_amp", "trainer.max_steps=40", "trainer.val_check_interval=40",
                 "data.train_size=1280", "data.val_size=256", "+backends.pins.bn_relu_pool=cpu", "threads=1",
                 "trainer.enable_model_summary=false", f"output_dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    assert cfg.model._target_ == "hetrain.models.resnet.ResNet" and cfg.model.fused
    assert cfg.trainer.precision == "auto"
    threads = torch.get_num_threads()
    try:
        acc = run(cfg)
    finally:  # run() set both for the whole process
        plugins.configure(pins={})
        torch.set_num_threads(threads)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "ok" and summary["steps"] == 40
    assert summary["precision"] == choose_precision("cpu")
    assert list(summary["stages"]) == ["stem", "layer1", "layer2", "layer3", "head"]
    assert acc == summary["metrics"]["val/acc"] and acc > 0.3, summary  # chance is 0.1
