"""`tritongpt eval` (HellaSwag-format scoring, train/evaluate.py) against an independent scoring of
the same items with `transformers`, and `tritongpt export` (train/export.py) round trips into a
GPT2LMHeadModel with the same logits. Items files are written here, in HellaSwag's format."""

from __future__ import annotations

import contextlib
import io
import json

import pytest
import torch
from _util import assert_rel_close, tol
from test_model import random_state, tiny_config

from tritongpt.cli import main
from tritongpt.data.tokenizer import get_encoding
from tritongpt.model.gpt import GPT
from tritongpt.model.hf import load_hf
from tritongpt.train import checkpoint, evaluate

transformers = pytest.importorskip("transformers")

ITEMS = [
    {"ctx": "A man is sitting on a roof. He", "label": 3, "ind": 4, "activity_label": "Roof shingle removal",
     "endings": ["is using wrap to wrap a pair of skis.", "is ripping level tiles off.",
                 "is holding a rubik's cube.", "starts pulling up roofing on a roof."]},
    {"ctx": "The chef cracks two eggs into the pan and", "label": 0,
     "endings": ["stirs them gently.", "throws the pan away.", "sings to the toaster.", "goes to sleep."]},
    {"ctx": "She opens the door", "label": 2, "endings": ["and", "of the moon", "and walks in.", "ok"]},
    {"ctx": "Two kids ride their bikes down the hill, laughing as", "label": 1,
     "endings": ["the car", "the wind blows through their hair.", "purple seven.", "they"]},
    {"ctx": "He plugs in the guitar,", "label": 0,
     "endings": ["tunes it, and starts to play.", "eats it.", "and the", "folds the guitar into a swan and flies."]},
]


def save_random_gpt2(path, noise: float):
    """Save at `path` and return a small GPT2LMHeadModel with GPT-2's vocabulary, moved noise * N(0, 1) from init."""
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=2))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * noise)
    model.eval().save_pretrained(path)
    return model


@pytest.fixture(scope="module")
def hf_gpt2(tmp_path_factory):
    """A small random GPT2LMHeadModel with GPT-2's vocabulary, saved as a Hugging Face directory."""
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    theirs = save_random_gpt2(path, noise=0.5)  # far from init, so the endings' scores differ
    return path, theirs.double()


def items_file(tmp_path, items=ITEMS):
    path = tmp_path / "items.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in items))
    return path


def independent_scores(model, item: dict) -> tuple[int, int, list[float]]:
    """(argmin of summed loss, argmin of mean loss, mean losses) of an item with transformers, float64."""
    enc = get_encoding("gpt2")
    context = enc.encode_ordinary(item["ctx"])
    sums, means = [], []
    for ending in item["endings"]:
        ending_ids = enc.encode_ordinary(" " + ending)
        ids = torch.tensor([context + ending_ids])
        with torch.no_grad():
            logprobs = torch.log_softmax(model(ids).logits[0], dim=-1)  # (L, V)
        picked = [-logprobs[len(context) + i - 1, tok].item() for i, tok in enumerate(ending_ids)]
        sums.append(sum(picked))
        means.append(sum(picked) / len(picked))
    return min(range(4), key=sums.__getitem__), min(range(4), key=means.__getitem__), means


def test_scores_match_an_independent_transformers_scoring(hf_gpt2, tmp_path):
    path, theirs = hf_gpt2
    items = evaluate.load_items(items_file(tmp_path))
    ours = load_hf(path, backend="torch").eval()
    expected = [independent_scores(theirs, item) for item in ITEMS]
    result = evaluate.evaluate(ours, get_encoding("gpt2"), items)
    assert result["items"] == len(ITEMS)
    assert result["acc"] == sum(e[0] == item["label"] for e, item in zip(expected, ITEMS)) / len(ITEMS)
    assert result["acc_norm"] == sum(e[1] == item["label"] for e, item in zip(expected, ITEMS)) / len(ITEMS)
    for item, (_, _, means) in zip(items, expected):  # and the scores themselves, not only the argmins
        tokens, mask = evaluate.render(get_encoding("gpt2"), item, ours.config.block_size)
        _, got = evaluate.ending_losses(ours, tokens, mask)
        assert_rel_close(got, torch.tensor(means, dtype=torch.float64), tol(torch.float32), "mean ending loss")
    assert len({e[1] for e in expected}) > 1  # the random model does not pick one index for everything


def test_eval_command(hf_gpt2, tmp_path, capsys):
    path, _ = hf_gpt2
    assert main(["eval", "--hf", str(path), "--task", "hellaswag", "--data", str(items_file(tmp_path)),
                 "--limit", "3", "--backend", "torch"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("hellaswag: 3 items, acc ") and "acc_norm" in line


@pytest.mark.parametrize("line, message", [
    ("{not json", "line 2: not JSON"),
    (json.dumps({"ctx": "x", "endings": ["a", "b"], "label": 5}), "line 2: 'label' must be an int in [0, 2)"),
    (json.dumps({"ctx": 3, "endings": ["a", "b"], "label": 0}), "line 2: 'ctx' must be a string"),
    (json.dumps({"ctx": "x", "endings": "ab", "label": 0}), "line 2: 'endings' must be a list"),
])
def test_malformed_item_is_one_line_error(hf_gpt2, tmp_path, capsys, line, message):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(ITEMS[0]) + "\n" + line + "\n")
    assert main(["eval", "--hf", str(hf_gpt2[0]), "--data", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and str(path) in err[0]


def test_missing_directory_is_one_line_error(tmp_path, capsys):
    assert main(["eval", "--hf", str(tmp_path / "nope"), "--data", str(items_file(tmp_path))]) == 2
    assert "not a directory" in capsys.readouterr().err


# ---- export ---------------------------------------------------------------------------------


def saved_run(tmp_path, **overrides):
    config = tiny_config(**overrides)
    model = GPT(config)
    model.load_state_dict(random_state(config))
    flat = {f: getattr(config, f) for f in config.__dataclass_fields__}
    checkpoint.save(tmp_path / "run", {"step": 1, "model": model.state_dict(), "config": flat, "tokenizer": "gpt2"})
    return model


def test_export_loads_in_transformers_with_the_same_logits(tmp_path):
    model = saved_run(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["export", "--ckpt", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 0
    assert "GPT2LMHeadModel.from_pretrained" in out.getvalue()
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "hf").double().eval()
    idx = torch.randint(0, model.config.real_vocab_size, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected = theirs(idx).logits
    got = model.double().eval().logits(model.hidden_states(idx))
    assert_rel_close(got, expected, tol(torch.float32), "logits")


def test_export_refuses_what_gpt2_cannot_express(tmp_path, capsys):
    saved_run(tmp_path, pos_embedding="rope")
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 2
    assert "pos_embedding" in capsys.readouterr().err and not (tmp_path / "hf").exists()
    (tmp_path / "run" / "ckpt_0000001.pt").unlink()
    saved_run(tmp_path)
    (tmp_path / "hf").mkdir()
    assert main(["export", "--ckpt", str(tmp_path / "run"), "--hf", str(tmp_path / "hf")]) == 2
    assert "exists" in capsys.readouterr().err
