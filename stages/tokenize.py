"""DVC stage `tokenize`: prompts rendered with the template, labels masked to the response."""

from slmtune.outputs import staged_outputs
from slmtune.prompting import run_tokenize
from slmtune.stage import stage_main


@stage_main
def main(config):
    with staged_outputs(config.paths.tokenized, config.paths.token_stats) as (tokenized_dir, stats_path):
        run_tokenize(config, tokenized_dir, stats_path)


if __name__ == "__main__":
    main()
