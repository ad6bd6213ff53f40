"""DVC stage `augment`: the training split plus generated questions and restatements (knowledge augmentation)."""

from slmtune.outputs import staged_outputs
from slmtune.pipeline import stage_main
from slmtune.pipeline.augment import run_augment


@stage_main
def main(config):
    with staged_outputs(config.paths.augmented, config.paths.augment_stats) as (augmented_dir, stats_path):
        run_augment(config, augmented_dir, stats_path)


if __name__ == "__main__":
    main()
