"""DVC stage `train`: LoRA fine-tuning; writes the adapter, its provenance and the per-step loss log."""

from slmtune.outputs import staged_outputs
from slmtune.stage import stage_main
from slmtune.training import run_training


@stage_main
def main(config):
    with staged_outputs(config.paths.adapter, config.paths.train_log) as (adapter_dir, log_path):
        run_training(config, adapter_dir, log_path)


if __name__ == "__main__":
    main()
