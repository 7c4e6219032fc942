"""The pipeline's shared package: one module per domain (see docs/design.md for the map)."""

import os

# Before any module here imports huggingface_hub, which reads it once: the stages never phone home.
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
