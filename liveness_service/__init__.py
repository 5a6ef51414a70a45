"""The liveness service: who is alive (participants: agents waiting for work)."""

from liveness_service.app import LivenessApp

__all__ = ["LivenessApp"]
