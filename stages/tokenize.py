"""DVC stage `tokenize`: conversations rendered with the template, labels masked to the answers; the data report."""

from slmtune.outputs import staged_outputs
from slmtune.pipeline import stage_main
from slmtune.pipeline.tokenize import run_tokenize


@stage_main
def main(config):
    paths = config.paths
    with staged_outputs(paths.tokenized, paths.token_stats, paths.data_report, paths.length_plot) as outputs:
        run_tokenize(config, *outputs)


if __name__ == "__main__":
    main()
