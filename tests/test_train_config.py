"""TrainConfig resolution: defaults < preset < TOML < flags, errors that name the key, the
generated flags, and the `train` / `sample` --help of the real command."""

import json

import pytest

from tritongpt.cli import main
from tritongpt.errors import TritonGPTError
from tritongpt.kernels import registry
from tritongpt.model.config import MODEL_OPS, GPTConfig
from tritongpt.train import config
from tritongpt.train.config import TRAIN_PRESETS, TrainConfig


def write_toml(tmp_path, text):
    path = tmp_path / "run.toml"
    path.write_text(text)
    return path


def test_precedence_defaults_preset_toml_flags(tmp_path):
    toml = write_toml(tmp_path, 'preset = "tiny"\nlr = 1e-3\nn_layer = 3\nwarmup_steps = 7\n')
    cfg = config.resolve({"n_layer": "2", "warmup_steps": "5"}, toml)
    assert cfg.preset == "tiny"
    assert cfg.model.n_layer == 2  # flag beats TOML beats preset
    assert cfg.warmup_steps == 5
    assert cfg.lr == 1e-3  # TOML beats the tiny preset's lr
    assert cfg.lr != TRAIN_PRESETS["tiny"]["lr"]
    assert cfg.max_steps == TRAIN_PRESETS["tiny"]["max_steps"]  # preset beats default
    assert cfg.max_steps != TrainConfig.__dataclass_fields__["max_steps"].default
    assert cfg.model.n_embd == GPTConfig.from_preset("tiny").n_embd  # the model preset
    assert cfg.beta1 == 0.9  # untouched default


def test_flag_preset_beats_toml_preset(tmp_path):
    toml = write_toml(tmp_path, 'preset = "tiny"\n')
    cfg = config.resolve({"preset": "small"}, toml)
    assert cfg.preset == "small"
    assert cfg.model == GPTConfig.from_preset("small")


def test_auto_preset_on_cpu():
    assert config.resolve({}).preset == ("gpt2" if __import__("torch").cuda.is_available() else "tiny")


@pytest.mark.parametrize("text,key", [
    ("bogus_key = 1\n", "bogus_key"),
    ("n_layer = 'four'\n", "n_layer"),
    ("lr = true\n", "lr"),
    ("compile = 1\n", "compile"),
    ("dtype = 'fp8'\n", "dtype"),
    ("model = 3\n", "model"),
])
def test_toml_errors_name_the_key(tmp_path, text, key):
    with pytest.raises(TritonGPTError, match=f"'{key}'"):
        config.resolve({}, write_toml(tmp_path, text))


def test_toml_syntax_error_and_missing_file(tmp_path):
    with pytest.raises(TritonGPTError, match="invalid TOML"):
        config.resolve({}, write_toml(tmp_path, "lr = = 3\n"))
    with pytest.raises(TritonGPTError, match="does not exist"):
        config.resolve({}, tmp_path / "missing.toml")


@pytest.mark.parametrize("flags,key", [
    ({"bogus": "1"}, "bogus"),
    ({"lr": "abc"}, "lr"),
    ({"n_layer": "2.5"}, "n_layer"),
    ({"compile": "maybe"}, "compile"),
])
def test_flag_errors_name_the_key(flags, key):
    with pytest.raises(TritonGPTError, match=f"'{key}'"):
        config.resolve(flags)


def test_range_and_model_errors():
    with pytest.raises(TritonGPTError, match="batch_size"):
        config.resolve({"batch_size": "0"})
    with pytest.raises(TritonGPTError, match="min_lr"):
        config.resolve({"lr": "1e-4", "min_lr": "1e-3"})
    with pytest.raises(TritonGPTError, match="n_embd"):
        config.resolve({"n_embd": "65"})  # not divisible by the 4 heads
    with pytest.raises(TritonGPTError, match="preset"):
        config.resolve({"preset": "gpt5"})
    with pytest.raises(TritonGPTError, match="dp_shard needs --parallel fsdp"):
        config.resolve({"dp_shard": "2"})
    with pytest.raises(TritonGPTError, match="dp_shard must be >= 1"):
        config.resolve({"parallel": "fsdp", "dp_shard": "0"})
    assert config.resolve({"parallel": "fsdp", "dp_shard": "8"}).dp_shard == 8


@pytest.mark.parametrize("flags,message", [
    ({"max_skipped_steps": "0"}, "max_skipped_steps must be >= 1"),
    ({"skip_spikes": "0"}, "skip_spikes must be > 0"),
    ({"skip_spikes": "-3"}, "skip_spikes must be > 0"),
    ({"skip_spikes": "nan"}, "skip_spikes must be > 0"),
    ({"spike_window": "1"}, "spike_window must be >= 2"),
])
def test_guard_settings_are_checked(flags, message):
    with pytest.raises(TritonGPTError, match=message):
        config.resolve(flags)


def test_guard_settings():
    cfg = config.resolve({})
    assert (cfg.max_skipped_steps, cfg.skip_spikes, cfg.spike_window) == (5, None, 128)  # spikes: opt-in
    cfg = config.resolve({"max_skipped_steps": "2", "skip_spikes": "5.5", "spike_window": "16"})
    assert (cfg.max_skipped_steps, cfg.skip_spikes, cfg.spike_window) == (2, 5.5, 16)
    assert config.resolve({"skip_spikes": "none"}).skip_spikes is None


def test_value_syntax():
    cfg = config.resolve({"compile": "true", "bias": "false", "window": "none", "n_kv_head": "2",
                          "attention": "torch", "dtype": "fp32"})
    assert cfg.compile is True and cfg.model.bias is False and cfg.model.window is None
    assert cfg.model.n_kv_head == 2 and cfg.model.attention == "torch" and cfg.dtype == "fp32"


def test_flat_dict_round_trip():
    cfg = config.resolve({"n_layer": "2", "decay_steps": "40", "lr": "3e-3"})
    flat = json.loads(json.dumps(cfg.to_dict()))
    assert set(flat) == set(config.RUN_FIELDS) | set(config.MODEL_FIELDS)
    assert config.from_dict(flat) == cfg


def test_cli_flags_generated_from_fields(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for name in [*config.RUN_FIELDS, *config.MODEL_FIELDS]:
        assert "--" + name.replace("_", "-") in out, name
    assert "tritongpt train" in out


def test_train_help_lists_the_variable_of_every_op_the_model_calls(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())  # the epilog is wrapped
    for name in (*MODEL_OPS, registry.EVERY_OP):
        variable = registry.env_var(name)
        assert variable in help_text, variable
        chosen = config.resolve({"preset": "tiny"}, env={variable: "torch"})
        assert getattr(chosen.model, name) == "torch", variable  # and config.resolve reads it


def test_sample_help(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["sample", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for flag in ("--ckpt", "--hf", "--prompt", "--max-new-tokens", "--temperature", "--top-k", "--top-p",
                 "--seed", "--device"):
        assert flag in out
    assert "tritongpt sample --ckpt" in out


def test_cli_errors_exit_2_before_writing(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "--out", str(out), "--lr", "abc"]) == 2
    err = capsys.readouterr().err
    assert "'lr'" in err and len(err.strip().splitlines()) == 1
    toml = write_toml(tmp_path, "n_layers = 2\n")
    assert main(["train", "--out", str(out), "--config", str(toml)]) == 2
    assert "'n_layers'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:  # argparse rejects unknown flags (no abbreviations either)
        main(["train", "--out", str(out), "--warmup", "3"])
    assert exc.value.code == 2
    assert "--warmup" in capsys.readouterr().err
    assert not out.exists()
