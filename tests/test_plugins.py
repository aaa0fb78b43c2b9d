"""The backend registry: selection, pinning three ways, fallback, strict mode, errors, third-party backends."""

import os
import subprocess
import sys
import textwrap
import threading
import types
import warnings

import pytest
import torch

from hetrain import plugins
from hetrain.ops._backends import OnTheirDevice

OP = "test_registry_op"


class Good:
    def __init__(self, tag):
        self.tag = tag

    def forward(self, value):
        return (self.tag, value)


class Broken:
    @staticmethod
    def forward(value):
        raise RuntimeError("kernel exploded")


@pytest.fixture
def op(monkeypatch):
    """A throwaway op with a fast, a slow and an unavailable backend; strict off unless a test sets it."""
    monkeypatch.delenv(plugins.ENV_PINS, raising=False)
    monkeypatch.delenv(plugins.ENV_PREFER, raising=False)
    monkeypatch.setenv(plugins.ENV_STRICT, "0")
    monkeypatch.setattr(plugins, "_warned", set())  # the fallback warnings come once per process, not per test
    plugins.register(OP, "fast", ("cpu", "cuda"), Good("fast"), priority=20)
    plugins.register(OP, "slow", ("cpu",), Good("slow"), priority=0)
    plugins.register(OP, "ghost", ("cpu",), Good("ghost"), priority=99, available=lambda: "driver missing")
    yield OP
    for name in ("fast", "slow", "ghost", "broken", "outside", "unserved"):
        plugins.unregister(OP, name)
    plugins.configure(pins={}, strict=None, prefer=[])


def test_best_available_backend_is_selected(op):
    assert plugins.select(op, "cpu").name == "fast"  # ghost has higher priority but is unavailable
    assert plugins.call(op, "forward", "cpu", 3) == ("fast", 3)


def test_a_backend_registered_or_removed_after_calls_serves_the_next_call(op):
    # Calls reuse their resolved backends; any change to the registry or the pins is seen at once.
    assert plugins.call(op, "forward", "cpu", 1) == ("fast", 1)
    plugins.register(OP, "outside", ("cpu",), Good("outside"), priority=50)
    assert plugins.call(op, "forward", "cpu", 2) == ("outside", 2)
    plugins.unregister(OP, "outside")
    assert plugins.call(op, "forward", "cpu", 3) == ("fast", 3)
    plugins.configure(pins={op: "slow"})
    assert plugins.call(op, "forward", "cpu", 4) == ("slow", 4)


def test_pin_by_environment(op, monkeypatch):
    monkeypatch.setenv(plugins.ENV_PINS, f"layer_norm=torch, {op}=slow")
    assert plugins.call(op, "forward", "cpu", 1) == ("slow", 1)


def test_pin_by_config_beats_environment(op, monkeypatch):
    monkeypatch.setenv(plugins.ENV_PINS, f"{op}=fast")
    plugins.configure(pins={op: "slow"})
    assert plugins.select(op, "cpu").name == "slow"


def test_pin_by_context_manager_beats_config_and_nests(op):
    plugins.configure(pins={op: "fast"})
    with plugins.use_backend(**{op: "slow"}):
        assert plugins.select(op, "cpu").name == "slow"
        with plugins.use_backend(**{op: "fast"}):
            assert plugins.select(op, "cpu").name == "fast"
        assert plugins.select(op, "cpu").name == "slow"
    assert plugins.select(op, "cpu").name == "fast"


def test_preferred_backends_come_first_where_they_serve_the_device(op, monkeypatch):
    plugins.configure(prefer=["slow"])  # "slow" serves the CPU only
    assert [b.name for b in plugins.candidates(op, "cpu")] == ["slow", "fast"]
    assert plugins.select(op, "cuda").name == "fast"
    plugins.configure(prefer=[])  # back to the environment's choice, here none
    assert plugins.select(op, "cpu").name == "fast"
    monkeypatch.setenv(plugins.ENV_PREFER, "ghost, slow")  # an unavailable preferred backend is passed over
    assert plugins.select(op, "cpu").name == "slow"
    with plugins.use_backend(**{op: "fast"}):  # a pin beats every preference
        assert plugins.select(op, "cpu").name == "fast"
    plugins.configure(prefer=["fast"])  # the config's preference beats the environment's
    assert plugins.select(op, "cpu").name == "fast"
    with plugins.preferring("slow"):  # and the block's beats the config's, on this thread
        assert plugins.select(op, "cpu").name == "slow"
    assert plugins.select(op, "cpu").name == "fast"


def test_an_empty_preference_leaves_the_order_in_force(op, monkeypatch):
    """``preferring()`` pushed an empty preference that hid HETRAIN_PREFER's and configure's, and
    ``configure(prefer="")`` refused '' as a backend no op registers."""
    monkeypatch.setenv(plugins.ENV_PREFER, "slow")
    with plugins.preferring():
        assert plugins.select(op, "cpu").name == "slow"
        assert plugins.open_scopes() is None  # nothing for a backward to reopen
    plugins.configure(prefer=["fast"])
    with plugins.preferring("slow"), plugins.preferring():  # nested: the outer block's preference still holds
        assert plugins.select(op, "cpu").name == "slow"
    plugins.configure(prefer="")  # as prefer=[]: back to the environment's choice
    assert plugins.preferred() == ("slow",)


def test_first_choice_entry_is_the_first_candidates_or_none(op):
    assert plugins.first_choice_entry(op, "cpu", "forward")(1) == ("fast", 1)
    assert plugins.first_choice_entry(op, "cpu", "forward_with_grad") is None  # the backend has no such entry
    assert plugins.first_choice_entry(op, "tpu", "forward") is None  # no backend serves the device: the call says why


def test_bad_pin_errors_name_the_problem(op, monkeypatch):
    with pytest.raises(plugins.BackendError, match=r"use_backend.*'nope' for op .*no such backend"):
        with plugins.use_backend(**{op: "nope"}):
            pass
    plugins.register(op, "outside", ("cpu",), Good("outside"))
    with plugins.use_backend(**{op: "outside"}):
        plugins.unregister(op, "outside")  # after the pin was checked: the call says so, naming where it was set
        with pytest.raises(plugins.BackendError, match=r"'outside' pinned .*\(by use_backend\(\.\.\.\)\) is not reg"):
            plugins.select(op, "cpu")
    with plugins.use_backend(**{op: "slow"}), pytest.raises(plugins.BackendError, match="does not serve device 'cuda'"):
        plugins.select(op, "cuda")
    with plugins.use_backend(**{op: "ghost"}), pytest.raises(plugins.BackendError, match="driver missing"):
        plugins.select(op, "cpu")
    monkeypatch.setenv(plugins.ENV_PINS, "garbage")
    with pytest.raises(plugins.BackendError, match="op=backend"):
        plugins.select(op, "cpu")


def test_failing_auto_backend_falls_back_and_warns_once(op):
    plugins.register(op, "broken", ("cpu",), Broken, priority=50)
    with pytest.warns(UserWarning, match="'broken'.*falling back to 'fast'"):
        assert plugins.call(op, "forward", "cpu", 1) == ("fast", 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert plugins.call(op, "forward", "cpu", 2) == ("fast", 2)


def test_a_fallback_warns_again_in_the_next_test(op):
    """Run after the test above, as test_no_fallback_inside_a_cuda_graph_capture is on a GPU machine: its fallback,
    of the same op and backend, did not warn, the warning having been given once in the process already."""
    plugins.register(op, "broken", ("cpu",), Broken, priority=50)
    with pytest.warns(UserWarning, match="'broken'.*falling back to 'fast'"):
        assert plugins.call(op, "forward", "cpu", 1) == ("fast", 1)


def test_strict_mode_and_pinned_backends_raise(op, monkeypatch):
    plugins.register(op, "broken", ("cpu",), Broken, priority=50)
    monkeypatch.setenv(plugins.ENV_STRICT, "1")
    with pytest.raises(RuntimeError, match="kernel exploded"):
        plugins.call(op, "forward", "cpu", 1)
    monkeypatch.setenv(plugins.ENV_STRICT, "0")
    with plugins.use_backend(**{op: "broken"}), pytest.raises(RuntimeError, match="kernel exploded"):
        plugins.call(op, "forward", "cpu", 1)


class BrokenOnCuda:
    @staticmethod
    def forward(value):
        value.cpu()  # a device-to-host copy: not allowed while a CUDA graph is captured
        return ("broken", value)


@pytest.mark.cuda
def test_no_fallback_inside_a_cuda_graph_capture(op):
    plugins.register(op, "broken", ("cuda",), BrokenOnCuda, priority=50)
    x = torch.ones(4, device="cuda")
    generator = torch.cuda.default_generators[x.device.index]
    fresh = generator.clone_state()
    graph = torch.cuda.CUDAGraph()
    try:
        with pytest.raises(RuntimeError, match="capture"), torch.cuda.graph(graph):
            plugins.call(op, "forward", "cuda", x)
    finally:
        generator.graphsafe_set_state(fresh)  # a failed capture leaves the generator in capture mode
    with pytest.warns(UserWarning, match="falling back to 'fast'"):  # outside a capture it falls back
        assert plugins.call(op, "forward", "cuda", x)[0] == "fast"


def test_unserved_device_error_names_op_device_and_registered(op):
    with pytest.raises(plugins.BackendError) as info:
        plugins.select(op, "xla")
    text = str(info.value)
    assert f"'{op}'" in text and "'xla'" in text and "fast(cpu, cuda)" in text and "driver missing" in text


def test_opt_in_device_is_used_only_when_pinned(op):
    plugins.register(op, "outside", ("cpu",), Good("outside"), priority=90, opt_in=("cpu",))
    assert plugins.select(op, "cpu").name == "fast"
    with plugins.use_backend(**{op: "outside"}):
        assert plugins.call(op, "forward", "cpu", 0) == ("outside", 0)


def test_a_backend_for_any_device_serves_every_device_type_torch_names_and_only_those(op):
    """The torch reference's: a fixed list of device types missed 'xla', 'mtia' and a renamed privateuse1 backend."""
    plugins.register(op, "outside", ("cpu", plugins.ANY_DEVICE), Good("outside"), priority=-1)
    assert plugins.select(op, "xla").name == "outside" and plugins.select(op, "mtia").name == "outside"
    assert [b.name for b in plugins.candidates(op, "cpu")] == ["fast", "slow", "outside"]  # priorities as before
    with pytest.raises(plugins.BackendError, match=r"serves device 'cdua'.*outside\(cpu, any device type\)"):
        plugins.select(op, "cdua")  # a typo is no device type: still said, not served by the reference
    with plugins.use_backend(**{op: "outside"}):
        assert plugins.call(op, "forward", "xla", 1) == ("outside", 1)
    with pytest.raises(ValueError, match=r"opt_in entry '\*' is not a device type"):
        plugins.register(op, "unserved", ("cpu",), Good("unserved"), opt_in=plugins.ANY_DEVICE)


def test_the_torch_reference_serves_the_privateuse1_backend_under_its_vendors_name():
    """torch_npu renames privateuse1 to 'npu': the reference, registered for 'privateuseone', served no NPU tensor.
    Renaming is once per process, hence the subprocess."""
    code = ("import torch; from hetrain import plugins; torch.utils.rename_privateuse1_backend('npu'); "
            "print(plugins.select('layer_norm', 'npu').name, plugins.candidates('layer_norm', 'cpu')[-1].name)")
    env = {k: v for k, v in os.environ.items() if k not in (plugins.ENV_PINS, plugins.ENV_PREFER)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["torch", "torch"]  # served on the NPU; still the last resort on the CPU


def test_register_from_outside(op):
    plugins.register(op, "outside", ("xla",), Good("outside"))
    assert plugins.call(op, "forward", "xla", 5) == ("outside", 5)


def test_entry_point_backend_from_an_installed_distribution(tmp_path):
    """A third-party distribution adds a backend through the entry-point group, without editing hetrain."""
    pkg = tmp_path / "acme_backend"
    pkg.mkdir()
    (pkg / "__init__.py").write_text(textwrap.dedent("""
        from hetrain import plugins

        class AcmeLayerNorm:
            @staticmethod
            def forward(x, weight, bias, eps):
                return "acme"

        def register():
            plugins.register("layer_norm", "acme", ("acme_npu",), AcmeLayerNorm, priority=10)
    """))
    dist = tmp_path / "acme_backend-1.0.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: acme-backend\nVersion: 1.0\n")
    (dist / "entry_points.txt").write_text("[hetrain.backends]\nacme = acme_backend:register\n")
    code = "from hetrain import plugins; b = plugins.select('layer_norm', 'acme_npu'); print(b.name)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert out.stdout.strip() == "acme"


def test_a_triton_that_fails_to_import_leaves_its_backend_unavailable_and_the_cpu_kernels_running(tmp_path):
    """A Triton raising RuntimeError at import (no driver) stopped `import hetrain` itself. (Lightning and
    torch.compile import torch._dynamo, which fails with such a Triton whatever hetrain does.)"""
    (tmp_path / "triton").mkdir()
    (tmp_path / "triton" / "__init__.py").write_text('raise RuntimeError("0 active drivers ([]). There should only '
                                                     'be one.")\n')
    code = ("import torch, hetrain; from hetrain import plugins; "
            "print(next(b for b in plugins.backends('layer_norm') if b.name == 'triton').why_unavailable()); "
            "print(plugins.select('layer_norm', 'cpu').name, hetrain.ops.layer_norm(torch.randn(2, 3)).shape)")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**env, "PYTHONPATH": str(tmp_path)})
    assert out.returncode == 0, out.stderr[-2000:]
    reason, selected = out.stdout.strip().splitlines()
    assert reason == "triton failed to import (RuntimeError: 0 active drivers ([]). There should only be one.)"
    assert selected == "cpu torch.Size([2, 3])"


def test_hetrains_own_triton_module_failing_to_import_is_named_as_such_with_its_traceback(tmp_path):
    """Any error of a kernel module was reported as "triton failed to import": a bug in hetrain's kernels (a NameError)
    read as a broken Triton, without a traceback."""
    (tmp_path / "broken_kernels.py").write_text("undefined_helper()\n")
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from hetrain.ops import _backends; "
            "print(_backends._import_triton_module('broken_kernels'))")
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ("hetrain's Triton kernels (broken_kernels) failed to import (NameError: name "
                                  "'undefined_helper' is not defined)")
    assert "Traceback" in out.stderr and "undefined_helper()" in out.stderr


def test_every_fused_call_runs_in_a_named_profiler_range():
    import torch

    import hetrain

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        hetrain.ops.layer_norm(torch.randn(4, 8, requires_grad=True)).sum().backward()
    names = {e.name for e in prof.events()}
    assert "hetrain::layer_norm.forward[cpu]" in names and "hetrain::layer_norm.backward[cpu]" in names


def test_triton_entry_points_pass_through_off_the_gpu_and_keep_the_modules_attributes():
    module = types.ModuleType("fake_triton_op")
    module.LIMIT, module.forward = 7, lambda x, k=1: x * k
    proxy = OnTheirDevice(module)
    assert proxy.LIMIT == 7 and proxy.forward(torch.ones(2), k=3).tolist() == [3.0, 3.0]
    assert proxy.forward is proxy.forward  # wrapped once
    with pytest.raises(AttributeError):
        proxy.backward  # noqa: B018


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two GPUs")
def test_triton_entry_points_launch_on_the_gpu_their_tensors_are_on():
    module = types.ModuleType("fake_triton_op")
    module.where = lambda x: torch.cuda.current_device()
    assert OnTheirDevice(module).where(torch.ones(1, device="cuda:1")) == 1 and torch.cuda.current_device() == 0


def test_a_preferred_backend_no_op_registers_is_refused_with_the_nearest_name():
    """``backends.prefer=[cdua]`` left the order as it was, silently."""
    with pytest.raises(plugins.BackendError, match=r"preferred backend 'cdua' is registered for no op .*'cuda'"):
        plugins.configure(prefer=["cdua"])


def test_the_backend_listing_offers_an_opt_in_device_only_where_it_is_served(op):
    plugins.register(op, "served", ("cpu",), Good("served"), priority=90, opt_in=("cpu",))
    plugins.register(op, "unserved", ("cuda",), Good("unserved"), priority=80, opt_in=("cpu",))
    listing = plugins._describe(op)
    assert "served(cpu; pinned only on cpu)" in listing
    assert "unserved(cuda)" in listing  # said "pinned only on cpu", and a pin on the CPU is refused


def test_a_pin_for_an_op_no_backend_registers_is_refused_with_the_nearest_name(monkeypatch):
    """``use_backend(conv_bn_relu_pool=...)`` (the function's name, not the op's) pinned nothing, silently."""
    with pytest.raises(plugins.BackendError, match=r"names op 'conv_bn_relu_pool', .*did you mean 'bn_relu_pool'"):
        with plugins.use_backend(conv_bn_relu_pool="cpu"):
            pass
    with pytest.raises(plugins.BackendError, match="names op 'layernorm'"):
        plugins.configure(pins={"layernorm": "torch"})
    monkeypatch.setenv(plugins.ENV_PINS, "layernorm=torch")
    with pytest.raises(plugins.BackendError, match="names op 'layernorm'.*did you mean 'layer_norm'"):
        plugins.pinned("layer_norm")


def test_preferring_and_the_environment_refuse_an_unknown_backend_naming_where_it_was_given(op, monkeypatch):
    """``preferring("trch")`` and ``HETRAIN_PREFER=trch`` left the order as it was, silently."""
    with pytest.raises(plugins.BackendError, match=r"preferring\(\.\.\.\): .*'trch'.*did you mean 'torch'"):
        with plugins.preferring("trch"):
            pass
    monkeypatch.setenv(plugins.ENV_PREFER, "trch")
    with pytest.raises(plugins.BackendError, match=r"HETRAIN_PREFER='trch': .*did you mean 'torch'"):
        plugins.select(op, "cpu")
    monkeypatch.setenv(plugins.ENV_PREFER, "slow fast")  # read as one name "slow fast"
    with pytest.raises(plugins.BackendError, match="HETRAIN_PREFER='slow fast'.*separated by commas"):
        plugins.select(op, "cpu")


def test_configure_keeps_strict_when_left_out_and_none_returns_it_to_the_environment(op, monkeypatch):
    """A sweep job's ``backends.strict: true`` outlived it: the next job's ``null`` left it on."""
    monkeypatch.setenv(plugins.ENV_STRICT, "0")
    plugins.configure(strict=True)
    plugins.configure(pins={})
    assert plugins.strict()
    plugins.configure(pins={}, strict=None, prefer=[])  # what train.py passes for backends.strict: null
    assert not plugins.strict()


def test_an_unreadable_strict_setting_is_refused_at_the_first_call_not_at_the_first_failure(op, monkeypatch):
    """``HETRAIN_STRICT=maybe`` was read only once a backend failed: the run went on, and its first failure raised
    this error where the fallback was due."""
    monkeypatch.setenv(plugins.ENV_STRICT, "maybe")  # as a shell sets it, before the first call resolves the op
    with pytest.raises(plugins.BackendError, match="cannot read HETRAIN_STRICT='maybe': expected 1, true"):
        plugins.call(op, "forward", "cpu", 2)
    plugins.configure(strict=False)  # configure's choice overrides the variable
    assert plugins.call(op, "forward", "cpu", 3) == ("fast", 3)
    plugins.configure(strict=None)  # back to the variable, which is read again
    with pytest.raises(plugins.BackendError, match="cannot read HETRAIN_STRICT='maybe'"):
        plugins.select(op, "cpu")


@pytest.mark.parametrize("value", ["false", "off", 0, 1])
def test_configure_refuses_a_strict_that_is_not_a_bool(op, value):
    """``configure(strict="false")`` turned strict mode on: ``bool("false")`` is true."""
    with pytest.raises(ValueError, match=r"configure\(strict=.*\) takes True, False or None"):
        plugins.configure(pins={op: "slow"}, strict=value)
    assert not plugins.strict()
    assert plugins.pinned(op) is None  # a refused call changes nothing


def test_a_refused_configure_changes_nothing(op):
    """``configure(pins=..., prefer=["cdua"])`` refused the preference after putting the pins in force."""
    with pytest.raises(plugins.BackendError, match="preferred backend 'cdua'"):
        plugins.configure(pins={op: "slow"}, prefer=["cdua"], strict=True)
    assert plugins.pinned(op) is None and plugins.preferred() == () and not plugins.strict()
    with pytest.raises(plugins.BackendError, match="'slwo'"):
        plugins.configure(pins={op: "slwo"}, prefer=["slow"], strict=True)
    assert plugins.preferred() == () and not plugins.strict()
    assert plugins.select(op, "cpu").name == "fast"


def test_a_pin_to_a_backend_the_op_lacks_is_refused_where_it_is_set(op, monkeypatch):
    """``configure(pins={'layer_norm': 'trch'})`` was accepted and failed at the first call, naming no source."""
    with pytest.raises(plugins.BackendError, match=r"configure\(pins=\.\.\.\) .*backends.pins.*'trch' for op "
                                                   r"'layer_norm'.*did you mean 'torch'"):
        plugins.configure(pins={"layer_norm": "trch"})
    with pytest.raises(plugins.BackendError, match=r"use_backend\(\.\.\.\): .*'trch' for op 'layer_norm'"):
        with plugins.use_backend(layer_norm="trch"):
            pass
    for setting, says in [("layer_norm=trch", "'trch' for op 'layer_norm'"),
                          ("layer_nrom=torch", "names op 'layer_nrom'"),
                          ("layer_norm=torch;rms_norm=torch", "pins separated by commas")]:
        monkeypatch.setenv(plugins.ENV_PINS, setting)
        with pytest.raises(plugins.BackendError, match=f"HETRAIN_BACKEND='{setting}'.*{says}"):
            plugins.select(op, "cpu")
    monkeypatch.delenv(plugins.ENV_PINS)
    plugins.register(op, "outside", ("cpu",), Good("outside"))
    plugins.configure(pins={op: "outside"})
    plugins.unregister(op, "outside")  # after the pin was checked: the call names where it was set
    with pytest.raises(plugins.BackendError, match=r"'outside' pinned .*\(by configure\(pins=\.\.\.\)"):
        plugins.select(op, "cpu")


def test_a_lone_device_string_is_one_device(op):
    """``devices="npu"`` registered the devices 'n', 'p' and 'u'."""
    assert plugins.register(op, "outside", "npu", Good("outside")).devices == ("npu",)
    assert plugins.call(op, "forward", "npu", 1) == ("outside", 1)


def test_a_torch_device_registers_as_its_type(op):
    """``devices=torch.device("cpu")`` raised "'torch.device' object is not iterable"."""
    assert plugins.register(op, "outside", torch.device("cpu"), Good("outside"), priority=90).devices == ("cpu",)
    assert plugins.register(op, "outside", [torch.device("cpu"), "xla"], Good("outside"), priority=90).devices == (
        "cpu", "xla")
    assert plugins.select(op, "cpu").name == "outside"


def test_a_device_given_where_a_call_asks_for_a_type_counts_as_its_type(op):
    """``select(op, torch.device("cpu"))`` or ``"cpu:0"`` matched no backend: "no available backend serves device"."""
    plugins.register(op, "outside", ("xla",), Good("outside"))
    assert plugins.select(op, torch.device("cpu")).name == "fast"
    assert plugins.select(op, "cpu:0").name == "fast"
    assert "fast" in [b.name for b in plugins.candidates(op, torch.device("cuda", 1))]
    assert plugins.call(op, "forward", torch.device("xla", 2), 1) == ("outside", 1)
    assert plugins.first_choice_entry(op, "cpu:0", "forward")(2) == ("fast", 2)
    with pytest.raises(plugins.BackendError, match="serves device '0'"):  # not an AttributeError of int
        plugins.select(op, 0)


def test_the_fallback_warning_points_at_the_line_that_called_the_op(monkeypatch):
    import hetrain

    monkeypatch.setenv(plugins.ENV_STRICT, "0")
    plugins.register("layer_norm", "broken_for_warning", ("cpu",), Broken, priority=99)  # warned once per process
    try:
        with pytest.warns(UserWarning, match="'broken_for_warning'") as caught:
            hetrain.nn.LayerNorm(8)(torch.randn(2, 8, requires_grad=True))  # through torch's Module and Function
    finally:
        plugins.unregister("layer_norm", "broken_for_warning")
    [warning] = [w for w in caught if "broken_for_warning" in str(w.message)]
    assert warning.filename == __file__ and "once per op and backend in a process" in str(warning.message)


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11's")
def test_an_error_let_through_names_the_backend_and_op_and_why_nothing_else_was_tried(op, monkeypatch):
    plugins.register(op, "broken", ("cpu",), Broken, priority=50)
    monkeypatch.setenv(plugins.ENV_STRICT, "1")
    with pytest.raises(RuntimeError, match="kernel exploded") as info:
        plugins.call(op, "forward", "cpu", 1)
    assert info.value.__notes__ == [f"hetrain: raised by backend 'broken' of op '{op}' on cpu; strict mode "
                                    "(HETRAIN_STRICT=1 or configure(strict=True)) raises rather than falling back"]
    with plugins.use_backend(**{op: "broken"}), pytest.raises(RuntimeError) as info:
        plugins.call(op, "forward", "cpu", 1)
    assert "pinned (by use_backend(...))" in info.value.__notes__[0]


class ExplodingWithGrad:
    """A backend whose C++-autograd-style entry fails too."""

    @staticmethod
    def forward_with_grad(*args):
        raise RuntimeError("kernel exploded")

    forward = backward = forward_with_grad


@pytest.mark.skipif(sys.version_info < (3, 11), reason="exception notes are Python 3.11's")
def test_a_failing_autograd_entry_names_its_backend_and_op(monkeypatch):
    import hetrain

    monkeypatch.setenv(plugins.ENV_STRICT, "1")
    plugins.register("layer_norm", "exploding", ("cpu",), ExplodingWithGrad, priority=99)
    try:
        with pytest.raises(RuntimeError, match="kernel exploded") as info:
            hetrain.ops.layer_norm(torch.randn(2, 8, requires_grad=True))
    finally:
        plugins.unregister("layer_norm", "exploding")
    assert "hetrain: raised by backend 'exploding' of op 'layer_norm' on cpu" in info.value.__notes__[0]


def test_a_triton_pin_on_cpu_tensors_says_how_triton_runs_there(op):
    plugins.register(op, "triton", ("cuda",), Good("triton"))  # as without TRITON_INTERPRET=1
    try:
        with plugins.use_backend(**{op: "triton"}), pytest.raises(plugins.BackendError, match="TRITON_INTERPRET=1"):
            plugins.select(op, "cpu")
    finally:
        plugins.unregister(op, "triton")


def test_a_backend_unregistered_while_another_thread_resolves_is_not_chosen_afterwards(op):
    """The other thread's resolution, from the registry as it was, was cached after the unregister emptied the
    cache, and the removed backend stayed chosen for good."""
    probing, release = threading.Event(), threading.Event()

    def probe():
        probing.set()
        assert release.wait(10)  # holds the resolution until the backend is gone
        return True

    plugins.register(op, "outside", ("cpu",), Good("outside"), priority=50, available=probe)
    resolving = threading.Thread(target=plugins.select, args=(op, "cpu"))
    resolving.start()
    assert probing.wait(10)
    plugins.unregister(op, "outside")
    release.set()
    resolving.join()
    assert plugins.select(op, "cpu").name == "fast"


def test_blocks_closed_out_of_order_take_off_their_own_pins_and_preferences(op):
    """A block held by a generator and closed inside a later block took the later block's entry off instead."""
    def held(block):
        with block:
            yield

    outer = held(plugins.use_backend(**{op: "slow"}))
    next(outer)
    with plugins.use_backend(**{op: "fast"}):
        outer.close()
        assert plugins.pinned(op) == "fast"
    assert plugins.pinned(op) is None
    outer = held(plugins.preferring("slow"))
    next(outer)
    with plugins.preferring("fast"):
        outer.close()
        assert plugins.preferred() == ("fast",)
    assert plugins.preferred() == ()


@pytest.mark.parametrize(("change", "says"), [
    (dict(priority="50"), "priority must be a number"),
    (dict(name=""), "name must be a non-empty string"),
    (dict(name=" "), "name must be a non-empty string"),
    (dict(name="a,b"), "name must be a non-empty string without whitespace or any of "),
    (dict(op=""), "op must be a non-empty string"),
    (dict(impl=None), "impl must provide the op's entry points"),
    (dict(devices=()), "devices must name at least one device type"),
    (dict(devices=("cpu", 3)), "devices must name at least one device type"),
    (dict(opt_in=(None,)), "opt_in must name device types"),
    # A backend serves a device type; these were taken and then never matched a call (opt_in: picked automatically).
    (dict(devices="cuda:1"), r"devices entry 'cuda:1' is not a device type: .* \(lower case, no index\); use 'cuda'"),
    (dict(devices=("cpu", "CPU")), r"devices entry 'CPU' is not a device type: .*; use 'cpu'"),
    (dict(devices=torch.device("cuda", 1)), r"devices entry device\(type='cuda', index=1\) is not a device type: "
                                            r".*; use 'cuda'"),
    (dict(opt_in="cpu:0"), r"opt_in entry 'cpu:0' is not a device type: .*; use 'cpu'"),
    (dict(available=True), "available must be a callable"),
])
def test_register_refuses_a_malformed_backend_naming_it(op, change, says):
    """Each was taken, and failed at the op's calls (a bare TypeError, or a fallback warning) or never applied."""
    args = dict(op=op, name="outside", devices=("cpu",), impl=Good("outside"), priority=50) | change
    with pytest.raises(ValueError, match=rf"register\({args['op']!r}, {args['name']!r}, \.\.\.\): {says}"):
        plugins.register(**args)
    assert "outside" not in [b.name for b in plugins.backends(op)]
    # An unavailable backend needs no entry points: its probe says why.
    assert plugins.register(op, "outside", ("cpu",), None, available=lambda: "no such library").impl is None


def test_an_op_whose_last_backend_is_unregistered_is_no_longer_listed():
    plugins.register("test_registry_lone_op", "only", ("cpu",), Good("only"))
    assert "test_registry_lone_op" in plugins.ops()
    plugins.unregister("test_registry_lone_op", "only")
    assert "test_registry_lone_op" not in plugins.ops()


def test_an_empty_pin_in_use_backend_pins_nothing_as_in_configure(op):
    """use_backend(op="") passed the pin check, then failed at the call as "backend '' is not registered"."""
    plugins.configure(pins={op: ""})
    assert plugins.pinned(op) is None
    with plugins.use_backend(**{op: ""}):
        assert plugins.pinned(op) is None
        assert plugins.call(op, "forward", "cpu", 1) == ("fast", 1)
    plugins.configure(pins={op: "slow"})
    with plugins.use_backend(**{op: ""}):  # the next pin down still applies
        assert plugins.select(op, "cpu").name == "slow"


PLUGIN_OP = "test_registry_plugin_op"


@pytest.fixture
def plugin_hooks(monkeypatch):
    """Entry-point plugins loaded anew, from the ``(name, hook)`` pairs a test appends instead of the installed."""
    hooks = []

    def fake_entry_points(group):
        return [types.SimpleNamespace(name=name, value=f"test_pkg:{name}", load=lambda hook=hook: hook)
                for name, hook in hooks] if group == plugins.ENTRY_POINT_GROUP else []

    monkeypatch.setattr(plugins, "entry_points", fake_entry_points)
    monkeypatch.setattr(plugins, "_entry_points_loaded", False)
    yield hooks
    plugins.unregister(PLUGIN_OP, "npu")


def test_a_thread_asking_while_the_plugins_load_waits_for_them(plugin_hooks, monkeypatch):
    """Marked loaded before its hooks ran: another thread asking meanwhile was told the op is unknown."""
    hook_running, release, asked = threading.Event(), threading.Event(), threading.Event()

    def slow_hook():  # importing a vendor's package takes a while
        hook_running.set()
        assert release.wait(10)
        plugins.register(PLUGIN_OP, "npu", ("npu",), Good("npu"))

    class Watched:
        """The load's lock, saying when the asking thread reaches it (where it waits for the load to end)."""

        def __init__(self):
            self.lock = threading.RLock()

        def __enter__(self):
            if threading.current_thread() is asking:
                asked.set()
            return self.lock.__enter__()

        def __exit__(self, *exc_info):
            return self.lock.__exit__(*exc_info)

    monkeypatch.setattr(plugins, "_entry_points_lock", Watched(), raising=False)
    plugin_hooks.append(("npu", slow_hook))
    answers = []

    def ask():
        try:
            answers.append(plugins.select(PLUGIN_OP, "npu").name)
        except plugins.BackendError as exc:
            answers.append(exc)
        finally:
            asked.set()

    loading, asking = threading.Thread(target=plugins.ops), threading.Thread(target=ask)
    loading.start()
    assert hook_running.wait(10)
    asking.start()
    assert asked.wait(10)  # waiting for the load, or (unlocked) already answered
    release.set()
    loading.join()
    asking.join()
    assert answers == ["npu"]


def test_a_plugin_that_fails_to_load_warns_and_the_others_load_once(plugin_hooks):
    runs = []

    def broken():
        runs.append("broken")
        raise ImportError("no module named 'vendor_runtime'")

    def good():
        runs.append("good")
        assert PLUGIN_OP not in plugins.ops()  # a hook asking the registry sees it as loaded so far
        plugins.register(PLUGIN_OP, "npu", ("npu",), Good("npu"))

    plugin_hooks += [("broken", broken), ("good", good)]
    with pytest.warns(UserWarning, match=r"backend plugin 'broken' \(test_pkg:broken\) failed to load: no module"):
        assert PLUGIN_OP in plugins.ops()
    assert plugins.select(PLUGIN_OP, "npu").name == "npu"
    assert runs == ["broken", "good"]  # each hook ran once
