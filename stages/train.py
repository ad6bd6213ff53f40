"""DVC stage `train`: fine-tuning; writes the adapter (or full model), its provenance and the per-step loss log.

With `train.num_processes > 1` it relaunches itself under `accelerate launch`; there every rank trains and
rank 0 alone writes the outputs and logs to MLflow."""

from slmtune.launch import is_main_process, launch_distributed, needs_launch
from slmtune.outputs import staged_outputs
from slmtune.pipeline import stage_main
from slmtune.pipeline.train import run_train


@stage_main
def main(config):
    if needs_launch(config):
        launch_distributed(config, __file__)
    elif not is_main_process():
        run_train(config, None, None)
    else:
        with staged_outputs(config.paths.adapter, config.paths.train_log) as (adapter_dir, log_path):
            run_train(config, adapter_dir, log_path)


if __name__ == "__main__":
    main()
