"""tritongpt.train: the training loop and its parts.

    tritongpt train --help

config.py (TrainConfig: defaults < preset < TOML < flags), trainer.py (the loop), checkpoint.py
(atomic save, resume, load_model), distributed.py (torchrun / DDP), cli.py and sample.py (the
`train` and `sample` commands).
"""
