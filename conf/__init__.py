"""Hydra configs of the trainers, installed as the package `algos.conf` (see algos.config.conf_dir)."""
