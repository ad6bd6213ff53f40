"""DVC stage `prepare`: raw data -> validated, de-duplicated, split records and their stats."""

from slmtune.data import run_prepare
from slmtune.outputs import staged_outputs
from slmtune.stage import stage_main


@stage_main
def main(config):
    with staged_outputs(config.paths.prepared, config.paths.data_stats) as (prepared_dir, stats_path):
        run_prepare(config, prepared_dir, stats_path)


if __name__ == "__main__":
    main()
