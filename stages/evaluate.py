"""DVC stage `evaluate`: base vs tuned on the test split (loss, perplexity, BLEU, ROUGE-1/2/L, exact match, token F1,
contains-match, per category), the merge parity and the optional quality gate."""

from slmtune.evaluation import run_evaluation
from slmtune.outputs import staged_outputs
from slmtune.stage import stage_main


@stage_main
def main(config):
    with staged_outputs(config.paths.metrics, config.paths.generations) as (metrics_path, generations_path):
        run_evaluation(config, metrics_path, generations_path)


if __name__ == "__main__":
    main()
