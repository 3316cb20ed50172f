"""``asteria-train``: train a small GPT on the Python standard library's sources.

The command trains a byte-level GPT (:mod:`asteria.train.model`) on an embedded corpus
(:mod:`asteria.train.corpus`) with AdamW or one of asteria's second-order optimizers
(:mod:`asteria.train.optimizers`), one configuration or a comparison of several
(:mod:`asteria.train.loop`), and writes a report (:mod:`asteria.train.report`). Run
``asteria-train --help`` (or ``python -m asteria.train --help``) for the options.

Importing this package does not import the compiled asteria library; the second-order
optimizers are loaded only when a run asks for one.
"""

from .cli import main
from .config import RunConfig, parse_compare
from .loop import RunResult, train

__all__ = ["RunConfig", "RunResult", "main", "parse_compare", "train"]
