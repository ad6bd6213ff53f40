"""DVC stage `report`: reports/before_after.md with answers, metrics and lineage."""

from slmtune.outputs import staged_outputs
from slmtune.reporting import run_report
from slmtune.stage import stage_main


@stage_main
def main(config):
    with staged_outputs(config.paths.report) as (report_path,):
        run_report(config, report_path)


if __name__ == "__main__":
    main()
