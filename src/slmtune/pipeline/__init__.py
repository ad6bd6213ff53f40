"""The stage layer: one module per DVC stage of `dvc.yaml`, each holding that stage's `run_<stage>` and
nothing else. A stage script in `stages/` loads `params.yaml`, calls its `run_*` inside
`staged_outputs` (all outputs or none), and turns a user error into one line with `stage_main`.

    base -> prepare -> augment -> tokenize -> train -> evaluate -> report
"""

from __future__ import annotations

import sys
from collections.abc import Callable

from ..config import Config, load_config
from ..errors import exit_code_of
from ..progress import quiet_libraries


def stage_main(main: Callable[[Config], None]) -> Callable[[], None]:
    """Wrap a stage body: `error: <one line>` on stderr and exit 1 for problems a user can fix."""

    def run() -> None:
        quiet_libraries()
        code = exit_code_of(lambda: main(load_config()))
        if code:
            sys.exit(code)

    return run
