"""The repository root is the package `tritongpt`, and Python puts the working directory first
on sys.path (`python -m pytest`, `python -c`, notebooks). Its folders must then never shadow an
installed distribution of the same name: Hugging Face's `kernels`, which transformers imports,
is the case that broke CI."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUBPACKAGES = ("kernels", "model", "train", "bench", "data")


def run_from_root(code: str) -> str:
    """Run `code` in a fresh interpreter whose working directory (sys.path[0]) is the repository root."""
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    return done.stdout


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_folders_are_namespace_packages(name):
    # a regular package (with __init__.py) in the working directory beats site-packages; a
    # namespace directory loses to any regular package of the same name on sys.path
    assert (ROOT / name).is_dir()
    assert not (ROOT / name / "__init__.py").exists(), f"{name}/__init__.py would shadow an installed `{name}`"


def test_hugging_face_kernels_is_not_shadowed():
    spec = importlib.util.find_spec("kernels")
    assert spec is not None and spec.origin, "Hugging Face's `kernels` is in the dev extra: pip install -e '.[dev]'"
    installed = Path(spec.origin).resolve()
    assert (ROOT / "kernels") not in installed.parents and "site-packages" in installed.parts
    found = run_from_root("import kernels; print(kernels.__file__)").strip()
    assert Path(found).resolve() == installed


def test_transformers_round_trip_from_root():
    # transformers imports `kernels` when it is installed; then our GPT goes to HF and back
    out = run_from_root(
        "import tempfile, torch, transformers\n"
        "from tritongpt import GPT, GPTConfig\n"
        "from tritongpt.model.hf import load_hf, save_hf\n"
        "torch.manual_seed(0)\n"
        "config = GPTConfig(vocab_size=128, real_vocab_size=100, block_size=16, n_layer=1, n_head=2, n_embd=32,"
        " backend='torch')\n"
        "ours = GPT(config).eval()\n"
        "with tempfile.TemporaryDirectory() as tmp:\n"
        "    theirs = transformers.GPT2LMHeadModel.from_pretrained(save_hf(ours, tmp + '/m')).eval()\n"
        "    back = load_hf(tmp + '/m', backend='torch')\n"
        "idx = torch.randint(0, 100, (1, 8))\n"
        "with torch.no_grad():\n"
        "    a, b, c = ours.logits(ours.hidden_states(idx)), theirs(idx).logits, back.logits(back.hidden_states(idx))\n"
        "print(float((a - b).abs().max() / b.abs().max()), float((c - b).abs().max() / b.abs().max()))\n")
    errors = [float(x) for x in out.split()]
    assert len(errors) == 2 and all(e <= 1e-5 for e in errors), out


def test_public_names_import_lazily_from_the_top_level_package():
    out = run_from_root(
        "import sys, tritongpt\n"
        "print('torch' in sys.modules)\n"
        "from tritongpt import GPT, GPTConfig, flash_attention, layer_norm, gelu_mlp\n"
        "print(all(callable(f) for f in (GPT, GPTConfig, flash_attention, layer_norm, gelu_mlp)))\n")
    assert out.split() == ["False", "True"]
