"""`tritongpt bench converge`: steps, tokens and training time to a validation loss, per optimizer.

    tritongpt bench converge --quick                      # CPU: tiny preset, tinyshakespeare, 200 steps
    tritongpt bench converge --preset gpt2 --data DIR --max-steps 5000 --target-loss 3.28
    tritongpt bench converge --quick --optimizers adamw muon --set muon_lr=0.05 --set backend=triton

Each optimizer trains the same run (`tritongpt train` with --preset, --data, --seed, --max-steps,
--eval-interval and every --set KEY=VALUE, each in its own directory under OUT/converge_<date>/)
from the same initial weights on the same batches. The target is --target-loss, or the first
optimizer's final val loss (by default AdamW's after --max-steps). For each optimizer: the first
evaluation at or below the target — its step, tokens and training seconds (evaluations and
checkpoints left out: `train_s` of the run's metrics) — or "not reached", and the steps ratio to
the first optimizer's. Writes OUT/converge_<device>_<date>.json (header and summary rows),
.csv (every evaluation: optimizer, step, tokens, train_s, val_loss) and .png (val loss against
step and against training seconds, one line per optimizer, when matplotlib is installed).
"""

from __future__ import annotations

import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from tritongpt.bench import tables
from tritongpt.errors import TritonGPTError
from tritongpt.files import atomic_write_bytes
from tritongpt.kernels import registry
from tritongpt.kernels.spec import DTYPES
from tritongpt.train import config as train_config
from tritongpt.train import trainer
from tritongpt.train.config import TrainConfig
from tritongpt.train.metrics import METRICS_FILE

# (full, --quick) defaults
DEFAULTS = {"preset": ("gpt2", "tiny"), "max_steps": (None, 200), "eval_interval": (None, 10)}
CURVE_COLUMNS = ("optimizer", "step", "tokens", "train_s", "val_loss")


def parse_settings(pairs: list[str]) -> dict[str, str]:
    """--set KEY=VALUE pairs as train flags (KEY: a `tritongpt train` setting, - or _)."""
    flags = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise TritonGPTError(f"--set takes KEY=VALUE (a `tritongpt train` setting), got {pair!r}")
        flags[key.strip().replace("-", "_")] = value.strip()
    return flags


def run_config(optimizer: str, *, preset: str, data: str | None, seed: int, device: str, max_steps: int | None,
               eval_interval: int | None, settings: dict[str, str], out: Path) -> TrainConfig:
    """The TrainConfig of one optimizer's run (checked: bad settings fail before any training)."""
    for key in ("optimizer", "out", "resume"):
        if key in settings:
            raise TritonGPTError(f"--set {key}=...: bench converge sets {key} itself")
    flags = {**settings, "preset": preset, "seed": str(seed), "device": device, "optimizer": optimizer,
             "out": str(out), "sample_tokens": "0"}
    if data is not None:
        flags["data"] = data
    for key, value in (("max_steps", max_steps), ("eval_interval", eval_interval)):
        if value is not None:
            flags[key] = str(value)
    cfg = train_config.resolve(flags)
    return dataclasses.replace(cfg, ckpt_interval=cfg.max_steps)  # one checkpoint, at the end


def curve(run_dir: Path, optimizer: str, tokens_per_step: int) -> list[dict]:
    """The run's evaluations from its metrics.jsonl, one row each."""
    records = [json.loads(line) for line in (run_dir / METRICS_FILE).read_text().splitlines() if line.strip()]
    return [{"optimizer": optimizer, "step": r["step"], "tokens": r["step"] * tokens_per_step,
             "train_s": r["train_s"], "val_loss": r["val_loss"]} for r in records if "val_loss" in r]


def reached(points: list[dict], target: float) -> dict | None:
    """The first evaluation at or below `target`, if any."""
    return next((p for p in points if p["val_loss"] <= target), None)


def summarize(curves: dict[str, list[dict]], target: float | None) -> tuple[float, list[dict]]:
    """(target, one summary row per optimizer); target defaults to the first run's final val loss."""
    first = next(iter(curves))
    target = curves[first][-1]["val_loss"] if target is None else target
    base = reached(curves[first], target)
    rows = []
    for optimizer, points in curves.items():
        hit = reached(points, target)
        rows.append({"optimizer": optimizer, "target_loss": target, "final_val_loss": points[-1]["val_loss"],
                     "final_step": points[-1]["step"],
                     "steps_to_target": hit["step"] if hit else None,
                     "tokens_to_target": hit["tokens"] if hit else None,
                     "train_s_to_target": hit["train_s"] if hit else None,
                     "steps_vs_first": hit["step"] / base["step"] if hit and base else None,
                     "note": "" if hit else "not reached"})
    return target, rows


def run(args, device: torch.device) -> int:
    """Train once per optimizer on `device`, then report (the bench CLI's `converge` target)."""
    quick = args.quick
    preset = args.preset or DEFAULTS["preset"][quick]
    max_steps = args.max_steps if args.max_steps is not None else DEFAULTS["max_steps"][quick]
    eval_interval = args.eval_interval if args.eval_interval is not None else DEFAULTS["eval_interval"][quick]
    settings = parse_settings(args.set)
    for key, value in (("batch_size", args.batch_size), ("block_size", args.seq_len)):
        if value is not None:
            settings[key] = str(value)
    if len(set(args.optimizers)) != len(args.optimizers):
        raise TritonGPTError(f"--optimizers lists one twice: {' '.join(args.optimizers)}")
    out = args.out or tables.DEFAULT_OUT
    curves: dict[str, list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="converge_") as scratch:
        cfgs = {opt: run_config(opt, preset=preset, data=args.data, seed=args.seed, device=device.type,
                                max_steps=max_steps, eval_interval=eval_interval, settings=settings,
                                out=Path(scratch) / opt) for opt in args.optimizers}
        for optimizer, cfg in cfgs.items():
            tables.log(f"[converge] {optimizer}: {cfg.preset}, {cfg.max_steps} steps, eval every "
                       f"{cfg.eval_interval}")
            code = trainer.train(cfg)
            if code != 0:
                raise TritonGPTError(f"the {optimizer} run stopped with exit code {code}")
            curves[optimizer] = curve(Path(cfg.out), optimizer, cfg.tokens_per_step)
    target, rows = summarize(curves, args.target_loss)
    first_cfg = next(iter(cfgs.values()))
    dtype = DTYPES[train_config.resolve_dtype(first_cfg.dtype, device)]
    head = tables.header(device, dtype, quick=quick, command=command(args, preset, max_steps, eval_interval),
                         timer="train_s: wall-clock seconds of training steps, evaluations and checkpoints left out",
                         ceilings={}, skipped=[], ref_dtype=dtype, interpreter=registry.interpreting())
    for unused in ("reference_dtype", "ceilings", "skipped"):  # kernel-benchmark fields
        del head[unused]
    head["target_loss"] = target
    print(format_table(head, rows))
    for path in write(out, head, rows, [p for points in curves.values() for p in points]):
        print(f"wrote {path}")
    return 0


SUMMARY_COLUMNS = ("optimizer", "final_step", "final_val_loss", "steps_to_target", "tokens_to_target",
                   "train_s_to_target", "steps_vs_first", "note")


def format_table(head: dict, rows: list[dict]) -> str:
    """The header lines, the target, and one line per optimizer."""
    cells = [list(SUMMARY_COLUMNS)] + [[tables.fmt(r[c], 4 if "loss" in c else 3) for c in SUMMARY_COLUMNS]
                                       for r in rows]
    return "\n".join([*tables.header_lines(head), f"command: {head['command']}",
                      f"target val loss {head['target_loss']:.4f}", "", *tables.aligned(cells)])


def command(args, preset: str, max_steps: int | None, eval_interval: int | None) -> str:
    """The command line that reproduces this run, defaults made explicit."""
    parts = ["tritongpt bench converge"] + ["--quick"] * args.quick + [
        f"--preset {preset}", f"--seed {args.seed}", "--optimizers " + " ".join(args.optimizers)]
    parts += [f"--max-steps {max_steps}"] * (max_steps is not None)
    parts += [f"--eval-interval {eval_interval}"] * (eval_interval is not None)
    parts += [f"--data {args.data}"] * (args.data is not None)
    parts += [f"--target-loss {args.target_loss}"] * (args.target_loss is not None)
    parts += [f"--set {pair}" for pair in args.set]
    return " ".join(parts)


def write(out_dir: Path, head: dict, rows: list[dict], points: list[dict]) -> list[Path]:
    """JSON (header and summary rows), CSV (every evaluation) and, with matplotlib, the curves."""
    out_dir.mkdir(parents=True, exist_ok=True)
    name = tables.stem(out_dir, head, prefix="converge_")
    json_path, csv_path, png_path = (out_dir / f"{name}.{ext}" for ext in ("json", "csv", "png"))
    atomic_write_bytes(json_path, tables.to_json(head, rows).encode())
    lines = [",".join(CURVE_COLUMNS)] + [",".join(str(p[c]) for c in CURVE_COLUMNS) for p in points]
    atomic_write_bytes(csv_path, ("\n".join(lines) + "\n").encode())
    figure = plot(head, points)
    if figure is None:
        return [json_path, csv_path]
    atomic_write_bytes(png_path, figure)
    return [json_path, csv_path, png_path]


def plot(head: dict, points: list[dict]) -> bytes | None:
    """Val loss against step and against training seconds, one line per optimizer."""
    plt = tables.pyplot()
    if plt is None:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for optimizer in dict.fromkeys(p["optimizer"] for p in points):
        mine = [p for p in points if p["optimizer"] == optimizer]
        for ax, x in zip(axes, ("step", "train_s")):
            ax.plot([p[x] for p in mine], [p["val_loss"] for p in mine], marker="o", markersize=3, label=optimizer)
    for ax, label in zip(axes, ("step", "training seconds")):
        ax.axhline(head["target_loss"], color="gray", linestyle="--", linewidth=1, label="target")
        ax.set_xlabel(label)
        ax.set_ylabel("val loss")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(tables.plot_title(head) + f" | {head['command']}", fontsize=8)
    return tables.png_bytes(plt, fig)
