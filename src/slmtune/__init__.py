"""slmtune: reproducible fine-tuning of small language models."""

import logging
import os
import sys

# Offline unless the user explicitly goes online (HF_HUB_OFFLINE=0); set before any HF import.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# MLflow (3.x) sends usage telemetry to config.mlflow-telemetry.io from every process that imports it, unless it
# finds a CI variable: off here as well (offline by default); MLFLOW_DISABLE_TELEMETRY=false turns it back on.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# bitsandbytes warns on every import that it cannot fetch an optional CPU kernel from the hub;
# its built-in fallback is what runs, so the warning only buries real messages.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
# Without a terminal (DVC's log, CI) library progress bars write carriage-return soup: off, here because tqdm reads
# TQDM_DISABLE when it is first imported. Our own progress (slmtune.progress) prints plain lines there instead.
if not sys.stderr.isatty():
    os.environ.setdefault("TQDM_DISABLE", "1")
