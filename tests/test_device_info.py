import os

import pytest
import torch

from hetrain.device_info import card_slug, cpu_model, device_name, host_description, result_card


@pytest.mark.skipif(not os.path.exists("/proc/cpuinfo"), reason="reads Linux's /proc/cpuinfo")
def test_the_cpu_is_named_by_its_model_not_its_architecture():
    with open("/proc/cpuinfo") as f:
        models = {line.split(":", 1)[1].strip() for line in f if line.startswith("model name")}
    if not models:
        pytest.skip("this kernel's /proc/cpuinfo names no model")
    assert cpu_model() in models and device_name("cpu") == cpu_model()
    assert host_description() == f"cpu ({cpu_model()}, {torch.get_num_threads()} threads)"
    assert host_description(3, "cores").endswith(", 3 cores)")


def test_card_slug_keeps_two_cards_apart_in_file_names():
    assert card_slug("NVIDIA H100 80GB HBM3") == "nvidia-h100-80gb-hbm3"
    assert card_slug("NVIDIA H200") != card_slug("NVIDIA H100 80GB HBM3")
    assert result_card("cpu") == "cpu"  # a CPU run's files are named for the CPU, whatever its model


@pytest.mark.cuda
def test_a_gpu_is_named_by_its_product_name():
    assert device_name("cuda:0") == torch.cuda.get_device_name(0)
    assert result_card("cuda:0") == card_slug(torch.cuda.get_device_name(0))
