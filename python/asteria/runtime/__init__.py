"""asteria's runtime: configuration and the refresh pipeline in front of the C++ scheduler."""

from asteria.runtime.config import RuntimeConfig
from asteria.runtime.pipeline import RefreshJob, RefreshPipeline

__all__ = ["RefreshJob", "RefreshPipeline", "RuntimeConfig"]
