"""A Jepsen-style consistency checker for kvstore histories (and Jepsen's own).

Theory of operation
-------------------
``check(history, model=..., initial=..., time_limit_s=...) -> Result`` reads a history (our
JSON Lines format of docs/history-format.md, Jepsen EDN, or Jepsen log lines), splits it by
key, decides linearizability of each key with the Wing-Gong-Lowe search (``wgl.py``) under a
model (``models.py``), and computes availability, lost writes, stale reads, sibling reads and
latencies (``analysis.py``).  A verdict is ``true`` or ``false`` only when the search proved it;
``unknown`` when a budget ran out.  ``report.py`` draws the timeline, ``cli.py`` is
``kvstore check``.  See docs/checker.md.
"""

from kvstore.checker.core import Result, Verdict, check
from kvstore.checker.history import History, HistoryFormatError, Op
from kvstore.checker.models import MODEL_NAMES, ModelError
from kvstore.checker.wgl import Counterexample, KeyResult

__all__ = [
    "MODEL_NAMES",
    "Counterexample",
    "History",
    "HistoryFormatError",
    "KeyResult",
    "ModelError",
    "Op",
    "Result",
    "Verdict",
    "check",
]
