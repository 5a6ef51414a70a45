"""The liveness service: who is alive (participants: agents waiting for work)."""

from vigil.liveness_service.app import LivenessApp

__all__ = ["LivenessApp"]
