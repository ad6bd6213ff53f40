"""DVC stage `prepare`: raw data -> validated, de-duplicated, split records and their stats."""

from slmtune.outputs import staged_outputs
from slmtune.pipeline import stage_main
from slmtune.pipeline.prepare import run_prepare


@stage_main
def main(config):
    with staged_outputs(config.paths.prepared, config.paths.data_stats) as (prepared_dir, stats_path):
        run_prepare(config, prepared_dir, stats_path)


if __name__ == "__main__":
    main()
