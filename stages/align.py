"""DVC stage `align`: preference tuning (DPO, ORPO, KTO) of the SFT adapter, or its pass-through."""

from slmtune.outputs import staged_outputs
from slmtune.pipeline import stage_main
from slmtune.pipeline.align import run_align


@stage_main
def main(config):
    paths = config.paths
    with staged_outputs(paths.aligned, paths.preference_metrics, paths.preference_generations) as staged:
        run_align(config, *staged)


if __name__ == "__main__":
    main()
