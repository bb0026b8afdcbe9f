"""The registry (kernels/registry.py): precedence of the ways to pick a backend (flags, config,
environment read at the command line's edge), errors for unknown or unusable names, `auto`,
built-in ops found by their spec files and loaded on first use, and backends from installed
packages (entry points).

    python -m pytest -q tests/test_registry.py
"""

import os
import subprocess
import sys

import pytest
import torch
from _util import install_plugin

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import layer_norm as triton_layer_norm
from tritongpt.kernels import layer_norm_spec, registry
from tritongpt.train import config as train_config
from tritongpt.train.auto import resolve_backends

OP = "layer_norm"
OP_ENV = "TRITONGPT_LAYER_NORM"
GLOBAL_ENV = "TRITONGPT_BACKEND"


@pytest.fixture
def triton_here(monkeypatch):
    """Triton usable (the test setup runs the interpreter without a GPU)."""
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return monkeypatch


@pytest.fixture
def no_triton(monkeypatch):
    """A machine where Triton cannot run: no CUDA and no interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return monkeypatch


def chosen(flags: dict, env: dict) -> str:
    """The layer_norm backend `tritongpt train` would use with these flags and environment (the
    other ops pinned, so a global choice reaches layer_norm alone)."""
    cfg = train_config.resolve({"preset": "tiny", "attention": "torch", "mlp": "torch", "linear_cross_entropy": "torch",
                                **flags}, env=env)
    return resolve_backends(cfg.model, torch.device("cpu")).layer_norm


# (--layer-norm, TRITONGPT_LAYER_NORM, --backend, TRITONGPT_BACKEND) -> winner. Each level set to
# one backend over lower levels set to the other, both ways round; a level above an unknown name
# wins without the unknown name being looked at.
PRECEDENCE = [
    (("torch", "triton", "triton", "triton"), "torch"),
    (("triton", "torch", "torch", "torch"), "triton"),
    ((None, "torch", "triton", "triton"), "torch"),
    ((None, "triton", "torch", "torch"), "triton"),
    ((None, None, "torch", "triton"), "torch"),
    ((None, None, "triton", "torch"), "triton"),
    ((None, None, None, "torch"), "torch"),
    ((None, None, None, "triton"), "triton"),
    ((None, None, None, None), "triton"),  # auto: Triton usable here (CUDA or interpreter)
    (("torch", "nosuch", "nosuch", "nosuch"), "torch"),
    ((None, None, "auto", "torch"), "triton"),
]


@pytest.mark.parametrize("levels,winner", PRECEDENCE)
def test_precedence(levels, winner, triton_here):
    flag, op_env, default, global_env = levels
    flags = {k: v for k, v in (("layer_norm", flag), ("backend", default)) if v}
    env = {k: v for k, v in ((OP_ENV, op_env), (GLOBAL_ENV, global_env)) if v}
    assert chosen(flags, env) == winner


def test_library_code_does_not_read_the_environment(triton_here):
    triton_here.setenv(OP_ENV, "torch")
    triton_here.setenv(GLOBAL_ENV, "torch")
    assert registry.choose(OP) == "triton"  # auto: the variables are the command line's business
    assert chosen({}, {}) == "triton"
    assert chosen({}, dict(os.environ)) == "torch"


def test_env_choices_reads_only_tritongpt_variables():
    env = {"TRITONGPT_ATTENTION": "sdpa", OP_ENV: "torch", GLOBAL_ENV: "triton", "TRITONGPT_NOSUCH": "x",
           "TRITONGPT_MLP": ""}
    assert registry.env_choices(env) == {"attention": "sdpa", "layer_norm": "torch", "backend": "triton"}


def test_resolve_returns_the_registered_callable():
    assert registry.resolve(OP, "torch") is layer_norm_spec.reference
    assert registry.resolve(OP, "triton") is triton_layer_norm.layer_norm
    assert registry.spec(OP) is layer_norm_spec.SPEC


def test_registry_loads_the_builtin_backends_itself():
    # no package __init__ imports the kernel files: the registry does, on first use
    code = ("from tritongpt.kernels import registry\n"
            "print(' '.join(f'{op}:{b}' for op in registry.ops() for b in registry.backends(op)))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    expected = {"attention:triton", "attention:sdpa", "layer_norm:triton", "mlp:triton", "mlp:torch",
                "linear_cross_entropy:chunked", "linear_cross_entropy:triton", "swiglu_mlp:torch", "swiglu_mlp:triton"}
    assert expected <= set(out.stdout.split())


def test_a_new_spec_file_is_an_op_and_nothing_else_is(tmp_path):
    # an op is its files: `<op>_spec.py` names it, no list does; its backends and kernel modules come
    # after every spec; configs, helpers and a backends file without a spec are no ops
    for name in ("zeta_spec", "zeta_backends", "zeta", "zeta_configs", "alpha_spec", "alpha", "alpha_table",
                 "orphan_backends", "orphan", "spec", "checks"):
        (tmp_path / f"{name}.py").write_text("")
    assert registry.op_modules(tmp_path, "pkg") == ["pkg.alpha_spec", "pkg.zeta_spec", "pkg.alpha",
                                                    "pkg.zeta_backends", "pkg.zeta"]


def test_the_builtin_ops_are_the_spec_files_of_the_kernels_folder():
    modules = registry.op_modules(registry.KERNELS_DIR, registry.KERNELS_PACKAGE)
    assert [name.removeprefix("tritongpt.kernels.") for name in modules] == [
        "attention_spec", "layer_norm_spec", "linear_cross_entropy_spec", "mlp_spec", "rms_norm_spec",
        "swiglu_mlp_spec", "attention_backends", "attention", "layer_norm_backends", "layer_norm",
        "linear_cross_entropy_backends", "linear_cross_entropy", "mlp", "rms_norm_backends", "rms_norm",
        "swiglu_mlp_backends", "swiglu_mlp"]


def test_every_op_has_torch_and_auto_resolves(triton_here):
    for op in registry.ops():
        assert "torch" in registry.backends(op)
        expected = "triton" if "triton" in registry.backends(op) else "torch"
        assert registry.choose(op) == expected


@pytest.mark.parametrize("source", ["layer_norm", "backend"])
def test_unknown_name_lists_choices_and_source(source, triton_here):
    explicit = "nosuch" if source == "layer_norm" else None
    default = "nosuch" if source == "backend" else None
    with pytest.raises(TritonGPTError) as err:
        registry.choose(OP, explicit, default)
    message = str(err.value)
    assert "'nosuch'" in message and f"from {source}" in message
    assert message.endswith("choices: torch, triton, auto")


def test_triton_unusable_is_an_error_not_a_fallback(no_triton):
    assert not registry.triton_usable()
    for explicit, default in (("triton", None), (None, "triton")):
        with pytest.raises(TritonGPTError,
                           match="needs a CUDA device or TRITON_INTERPRET=1; choices here: torch, auto"):
            registry.choose(OP, explicit, default)


def test_cuda_only_backends_are_refused_on_the_cpu(no_triton):
    assert registry.backend("attention", "sdpa-flash").needs == "cuda"
    assert not registry.usable("attention", "sdpa-flash", "cpu")
    assert "sdpa-flash" not in registry.choices("attention", "cpu")
    with pytest.raises(TritonGPTError, match="'sdpa-flash' .* needs CUDA"):
        registry.choose("attention", "sdpa-flash", device="cpu")


def test_auto_without_triton_is_torch(no_triton):
    assert registry.choose(OP) == "torch"
    assert registry.choose(OP, "auto") == "torch"
    assert registry.choices(OP) == ["torch", "auto"]


def test_device_decides_usability(no_triton):
    assert registry.triton_usable("cuda")
    assert not registry.triton_usable("cpu")
    assert registry.choose(OP, "triton", device="cuda") == "triton"


def test_auto_under_interpreter_is_triton(triton_here):
    triton_here.setenv("TRITON_INTERPRET", "1")
    triton_here.setattr(torch.cuda, "is_available", lambda: False)
    assert registry.interpreting()
    assert registry.choose(OP) == "triton"
    assert registry.choose(OP, device="cpu") == "triton"


def test_unknown_op():
    with pytest.raises(TritonGPTError,
                       match="unknown op 'norm'; ops: attention, layer_norm, linear_cross_entropy, mlp"):  # sorted
        registry.backends("norm")


def test_env_var_names():
    assert [registry.env_var(op) for op in ("attention", "layer_norm", "mlp", "backend")] == [
        "TRITONGPT_ATTENTION", "TRITONGPT_LAYER_NORM", "TRITONGPT_MLP", "TRITONGPT_BACKEND"]


def test_bad_registrations_are_refused():
    with pytest.raises(TritonGPTError, match="unknown op 'nosuch'"):
        registry.register("nosuch", "x", lambda: None)
    with pytest.raises(TritonGPTError, match="not callable"):
        registry.register(OP, "x", 3)
    with pytest.raises(TritonGPTError, match="needs must be one of"):
        registry.register(OP, "x", lambda: None, needs="tpu")
    with pytest.raises(TritonGPTError, match="already registered"):
        registry.register_op(layer_norm_spec.SPEC)
    assert "x" not in registry.backends(OP)


def run_with(env: dict[str, str], code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)


def test_plugins_add_backends_and_a_broken_one_is_one_warning(tmp_path):
    site = tmp_path / "site"
    install_plugin(site, "goodpkg", "goodpkg_plugin:register", "goodpkg_plugin", """
        def register(registry):
            registry.register("layer_norm", "goodpkg", registry.resolve("layer_norm", "torch"))
        """)
    env = install_plugin(site, "badpkg", "badpkg_plugin:register", "badpkg_plugin", """
        def register(registry):
            registry.register("nosuch_op", "badpkg", print)
        """)
    out = run_with(env, "from tritongpt.kernels import registry\nprint(registry.backends('layer_norm'))")
    assert out.returncode == 0, out.stderr
    assert "goodpkg" in out.stdout and "badpkg" not in out.stdout
    warnings = [line for line in out.stderr.splitlines() if "Warning" in line]
    assert len(warnings) == 1 and "'badpkg'" in warnings[0] and "unknown op 'nosuch_op'" in warnings[0]


def test_without_triton_the_pytorch_backends_remain():
    """Triton is a Linux-only dependency: where it is missing, the registry and the model still work."""
    code = ("import sys\nsys.modules['triton'] = None  # as if it were not installed\n"
            "from tritongpt.kernels import registry\n"
            "from tritongpt import GPT, GPTConfig\n"
            "print(all('torch' in registry.backends(op) and 'triton' not in registry.backends(op)"
            " for op in registry.ops()), sorted(set(GPT(GPTConfig.from_preset('tiny')).backend_names().values())))")
    out = run_with(dict(os.environ, TRITON_INTERPRET="0"), code)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "['torch']"]
