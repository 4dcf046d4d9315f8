"""The errors meant for users, and the one place that turns them into a message and exit code 2.

Every error a user can fix (a config key, a data file, a feature store, a checkpoint,
weights) derives from :class:`UserError` as well as from its usual built-in base, so the
command-line entry points catch them without importing the packages that raise them.
"""

from __future__ import annotations

import sys
from typing import Callable

__all__ = ["DataLoadingError", "TrainingDivergedError", "UserError", "run_with_user_errors"]


class UserError(Exception):
    """An error whose message says what was wrong, where, and what to do; no traceback needed."""


class DataLoadingError(UserError, RuntimeError):
    """A training sample could not be loaded (its id and the cause), or a loader worker died
    (its pid and the signal)."""


class TrainingDivergedError(UserError, RuntimeError):
    """Training diverged: non-finite losses, gradients or weights. The message names the
    step, the last finite loss, what to change and which checkpoint holds the last good state."""


def run_with_user_errors(action: Callable[[], int]) -> int:
    """Run ``action``; errors meant for users print one clear message and exit 2."""
    try:
        return action()
    except (UserError, FileNotFoundError) as error:
        sys.stderr.write(f"error: {error}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("interrupted; `--resume` continues from the last checkpoint\n")
        return 130
