"""DVC stage `evaluate`: base vs tuned on the test split (loss, perplexity, BLEU, ROUGE-1/2/L, exact match, token F1,
contains-match, per category), the merge parity and the optional quality gate."""

from slmtune.outputs import staged_outputs
from slmtune.pipeline import stage_main
from slmtune.pipeline.evaluate import run_evaluate


@stage_main
def main(config):
    with staged_outputs(config.paths.metrics, config.paths.generations) as (metrics_path, generations_path):
        run_evaluate(config, metrics_path, generations_path)


if __name__ == "__main__":
    main()
