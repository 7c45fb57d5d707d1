"""Shared fixtures. The backend package is imported from backend/ (installed editable by uv)."""

from __future__ import annotations

import os

# Tests never reach the network: Hugging Face and torch hub must use local files only.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
