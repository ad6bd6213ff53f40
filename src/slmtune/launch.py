"""Data-parallel training through `accelerate launch`: the train stage relaunches itself on
`train.num_processes` processes; every rank trains, rank 0 alone writes and logs."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
import yaml

from .config import Config
from .errors import ConfigError
from .hub import check_hub_push


def is_main_process() -> bool:
    """False in the non-zero ranks of an `accelerate launch`; those train but write and log nothing."""
    return int(os.environ.get("RANK", "0")) == 0


def needs_launch(config: Config) -> bool:
    """Whether this is the stage's own process and training wants several (`accelerate launch` sets RANK)."""
    return config.train.num_processes > 1 and "RANK" not in os.environ


def launch_command(config: Config, script: str) -> tuple[list[str], dict[str, str]]:
    """`accelerate launch` of the train stage on `train.num_processes` processes, and its environment: DDP
    over the GPUs or, without one, CPU processes over gloo (torchrun alone would leave each CPU process
    training on its own: accelerate needs ACCELERATE_USE_CPU to see them as one job); a given
    `train.accelerate_config` (multi-node, FSDP) decides the rest. `python -P` is kept (PYTHONSAFEPATH) so
    that stages/ does not shadow modules."""
    env = dict(os.environ, PYTHONSAFEPATH="1")
    command = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(config.train.num_processes)]
    settings = accelerate_settings(config)
    if config.train.accelerate_config:
        command += ["--config_file", config.train.accelerate_config]
    else:
        command += ["--multi_gpu", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    if int(settings.get("num_machines", 1)) == 1 and "main_process_port" not in settings:
        # torchrun's fixed default (29500) would make two trainings on one machine (a sweep's parallel
        # experiments) meet each other's rendezvous
        command += ["--main_process_port", str(free_port())]
    if not torch.cuda.is_available():
        threads = max(1, (os.cpu_count() or 1) // config.train.num_processes)
        command += ["--num_cpu_threads_per_process", str(threads)]
        env["ACCELERATE_USE_CPU"] = "true"
    return command + [script], env


def free_port() -> int:
    """A TCP port free on this machine now, for one job's rendezvous."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def accelerate_settings(config: Config) -> dict:
    """The settings of `train.accelerate_config` ({} without one)."""
    path = config.train.accelerate_config
    if not path:
        return {}
    try:
        return yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError) as error:
        raise ConfigError(f"train.accelerate_config: cannot read {path} ({error}).") from error


def check_accelerate_config(config: Config) -> None:
    """Refuse, before launching, an accelerate config that cannot run here: a missing file, or FSDP on CPU
    processes other than FSDP2 (FSDP1 needs a GPU) or with `use_cpu: true` (accelerate would then start one
    process; the stage itself tells accelerate, without a GPU, that the processes are CPU ones)."""
    settings = accelerate_settings(config)
    path = config.train.accelerate_config
    if settings.get("distributed_type") != "FSDP" or torch.cuda.is_available():
        return
    if settings.get("use_cpu"):
        raise ConfigError(
            f"{path}: use_cpu: true with FSDP makes accelerate start a single process; remove it (without a GPU "
            "the train stage runs the processes on CPU)."
        )
    if int((settings.get("fsdp_config") or {}).get("fsdp_version", 1)) != 2:
        raise ConfigError(
            f"{path}: FSDP on CPU processes needs FSDP2 (torch's fully_shard; FSDP1 needs a GPU): set "
            "fsdp_config.fsdp_version: 2."
        )


def launch_distributed(config: Config, script: str) -> None:
    """Run the train stage `script` under `accelerate launch`. Raises if any rank fails."""
    check_hub_push(config)
    check_accelerate_config(config)
    command, env = launch_command(config, script)
    print("launching: " + " ".join(command[1:]), flush=True)
    result = subprocess.run(command, env=env, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"accelerate launch exited with {result.returncode}")
