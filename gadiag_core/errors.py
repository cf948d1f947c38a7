"""User-facing errors: the CLI prints their message on one line.

UsageError          bad input (flag, config, data, plugin name): exit 2
EnvironmentFailure  the machine failed (disk full, read-only folder): exit 1,
                    the message names the path and how to resume
"""

import difflib
import errno
from contextlib import contextmanager


class UsageError(Exception):
    """Bad input from the user (flag, config, model path, plugin name).

    The message must name the bad input and say how to fix it."""


def did_you_mean(name: str, known) -> str:
    """' Did you mean X?' for the closest known name, or ''."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" Did you mean {close[0]!r}?" if close else ""


def unknown_name(kind: str, name: str, known) -> UsageError:
    """An error for an unknown plugin name, with a suggestion and what exists."""
    known = sorted(known)
    return UsageError(
        f"unknown {kind} {name!r}.{did_you_mean(name, known)} "
        f"Available: {', '.join(known) if known else '(none)'}"
    )


class EnvironmentFailure(Exception):
    """The environment failed the run (disk full, read-only folder, I/O error).

    The message names the path; the CLI exits 1. Work already stored is kept:
    rerunning the same command resumes."""


_REASONS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is exceeded",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


def cannot_write(path, exc: OSError, verb: str = "write") -> EnvironmentFailure:
    """'cannot write PATH: the disk is full' for an OSError met while writing."""
    reason = _REASONS.get(exc.errno) or exc.strerror or str(exc) or type(exc).__name__
    return EnvironmentFailure(
        f"cannot {verb} {path}: {reason}; what was stored before is kept: "
        "fix that, then rerun the same command to resume"
    )


@contextmanager
def writing(path):
    """Turn an OSError raised while writing under `path` into an EnvironmentFailure naming it."""
    try:
        yield
    except OSError as exc:
        raise cannot_write(exc.filename or path, exc) from None
