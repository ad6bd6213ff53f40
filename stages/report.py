"""DVC stage `report`: reports/before_after.md with metrics, loss and metric plots, per-category table,
merge parity and quality gate results, answers and lineage."""

from slmtune.outputs import staged_outputs
from slmtune.pipeline import stage_main
from slmtune.pipeline.report import run_report


@stage_main
def main(config):
    paths = config.paths
    with staged_outputs(paths.report, paths.loss_plot, paths.metrics_plot) as (report_path, loss_plot, metrics_plot):
        run_report(config, report_path, loss_plot, metrics_plot)


if __name__ == "__main__":
    main()
