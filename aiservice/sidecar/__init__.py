"""The AI-server sidecar: GPU, container, vLLM and WhisperX telemetry served as JSON from the GPU host."""

from aiservice.sidecar.app import create_app, run
from aiservice.sidecar.settings import SidecarSettings

__all__ = ["SidecarSettings", "create_app", "run"]
