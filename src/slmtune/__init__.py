"""slmtune: reproducible fine-tuning of small language models."""

import os

# Offline unless the user explicitly goes online (HF_HUB_OFFLINE=0); set before any HF import.
for _name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "HF_EVALUATE_OFFLINE"):
    os.environ.setdefault(_name, "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
