"""The backend registry (kernels/registry.py): precedence of the ways to pick a backend, errors
for unknown or unusable names, and `auto`.

    python -m pytest -q tests/test_registry.py
"""

import os
import subprocess
import sys

import pytest
import torch

from tritongpt.errors import TritonGPTError
from tritongpt.kernels import registry, reference
from tritongpt.kernels import layer_norm as triton_layer_norm

OP, OP_ENV = "layer_norm", "TRITONGPT_NORM"


@pytest.fixture
def clean_env(monkeypatch):
    """No backend environment variables, and Triton usable (the test setup runs the interpreter
    without a GPU)."""
    monkeypatch.delenv(OP_ENV, raising=False)
    monkeypatch.delenv(registry.GLOBAL_ENV, raising=False)
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
    return monkeypatch


@pytest.fixture
def no_triton(monkeypatch):
    """A machine where Triton cannot run: no CUDA and no interpreter."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv(OP_ENV, raising=False)
    monkeypatch.delenv(registry.GLOBAL_ENV, raising=False)
    return monkeypatch


# (explicit, per-op env, --backend default, TRITONGPT_BACKEND) -> winner. Each level set to one
# backend over lower levels set to the other, both ways round; a level above an unknown name
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
def test_precedence(levels, winner, clean_env):
    explicit, op_env, default, global_env = levels
    if op_env:
        clean_env.setenv(OP_ENV, op_env)
    if global_env:
        clean_env.setenv(registry.GLOBAL_ENV, global_env)
    assert registry.choose(OP, explicit, default) == winner


def test_resolve_returns_the_registered_callable(clean_env):
    assert registry.resolve(OP, "torch") is reference.layer_norm
    assert registry.resolve(OP, "triton") is triton_layer_norm.layer_norm


def test_registry_loads_the_builtin_backends_itself():
    # no package __init__ imports the kernel files: the registry does, on first use
    code = ("from tritongpt.kernels import registry\n"
            "print(' '.join(f'{op}:{b}' for op in registry.OP_FLAGS for b in registry.backends(op)))")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr
    assert {"attention:triton", "attention:sdpa", "layer_norm:triton", "mlp:triton", "mlp:torch"} <= set(out.stdout.split())


def test_every_op_has_torch_and_auto_resolves(clean_env):
    for op in registry.OP_FLAGS:
        assert "torch" in registry.backends(op)
        expected = "triton" if "triton" in registry.backends(op) else "torch"
        assert registry.choose(op) == expected


@pytest.mark.parametrize("source", ["--norm", OP_ENV, "--backend", registry.GLOBAL_ENV])
def test_unknown_name_lists_choices_and_source(source, clean_env):
    explicit = "nosuch" if source == "--norm" else None
    default = "nosuch" if source == "--backend" else None
    if source.startswith("TRITONGPT_"):
        clean_env.setenv(source, "nosuch")
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
    no_triton.setenv(OP_ENV, "triton")
    with pytest.raises(TritonGPTError, match=f"from {OP_ENV}"):
        registry.choose(OP)


def test_auto_without_triton_is_torch(no_triton):
    assert registry.choose(OP) == "torch"
    assert registry.choose(OP, "auto") == "torch"
    assert registry.choices(OP) == ["torch", "auto"]


def test_device_decides_usability(no_triton):
    assert registry.triton_usable("cuda")
    assert not registry.triton_usable("cpu")
    assert registry.choose(OP, "triton", device="cuda") == "triton"


def test_auto_under_interpreter_is_triton(clean_env):
    clean_env.setenv("TRITON_INTERPRET", "1")
    clean_env.setattr(torch.cuda, "is_available", lambda: False)
    assert registry.interpreting()
    assert registry.choose(OP) == "triton"
    assert registry.choose(OP, device="cpu") == "triton"


def test_unknown_op():
    with pytest.raises(TritonGPTError, match="unknown op 'norm'; ops: attention, layer_norm, mlp"):
        registry.backends("norm")


def test_env_var_names():
    assert [registry.env_var(op) for op in registry.OP_FLAGS] == [
        "TRITONGPT_ATTENTION", "TRITONGPT_NORM", "TRITONGPT_MLP"]
