"""DVC stage `base`: materialise the base model (GGUF dequantised once) as safetensors + tokenizer."""

from slmtune.outputs import staged_outputs
from slmtune.pipeline import stage_main
from slmtune.pipeline.base import run_base


@stage_main
def main(config):
    with staged_outputs(config.paths.base_model) as (base_dir,):
        run_base(config, base_dir)


if __name__ == "__main__":
    main()
