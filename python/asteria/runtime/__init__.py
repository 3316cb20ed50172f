"""asteria's runtime: configuration, the shared worker pool, the refresh pipeline in front of it, and the
memory tiers of the optimizer state."""

from asteria.runtime.config import DEFAULT_STALENESS, DEFAULT_STALENESS_STAGGERED, RuntimeConfig
from asteria.runtime.pinned import PinnedMemoryWarning
from asteria.runtime.pipeline import RefreshFailureWarning, RefreshJob, RefreshPipeline, accepted_refresh_step
from asteria.runtime.platform import Platform
from asteria.runtime.telemetry import StepTimeline
from asteria.runtime.tiers import BudgetError, StepFailedError, TierIOWarning, TierManager, memory_report
from asteria.runtime.workers import Runtime

__all__ = [
    "BudgetError",
    "DEFAULT_STALENESS",
    "DEFAULT_STALENESS_STAGGERED",
    "PinnedMemoryWarning",
    "Platform",
    "RefreshFailureWarning",
    "RefreshJob",
    "RefreshPipeline",
    "Runtime",
    "RuntimeConfig",
    "StepFailedError",
    "StepTimeline",
    "TierIOWarning",
    "TierManager",
    "accepted_refresh_step",
    "memory_report",
]
