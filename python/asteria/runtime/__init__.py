"""asteria's runtime: configuration, the shared worker pool and the refresh pipeline in front of it."""

from asteria.runtime.config import DEFAULT_STALENESS, RuntimeConfig
from asteria.runtime.pipeline import RefreshFailureWarning, RefreshJob, RefreshPipeline, accepted_refresh_step
from asteria.runtime.telemetry import StepTimeline
from asteria.runtime.workers import Runtime

__all__ = [
    "DEFAULT_STALENESS",
    "RefreshFailureWarning",
    "RefreshJob",
    "RefreshPipeline",
    "Runtime",
    "RuntimeConfig",
    "StepTimeline",
    "accepted_refresh_step",
]
