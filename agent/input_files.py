"""The one check every command that reads a user's file runs before anything is written: the
path names a regular file this process can open. Each refusal is one line (BadInput, exit 2)
saying which of the usual reasons it is; `Path.exists()` alone raises PermissionError in a
directory the user cannot enter, which surfaced as an internal error."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from core.errors import BadInput


def check_input_file(path: Path, not_regular_hint: str = "") -> None:
    """Raise BadInput unless `path` is a regular file that can be opened for reading.
    `not_regular_hint` is added when it is a pipe, FIFO or device (the reader needs a file)."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise BadInput(f"{path}: no such file") from None
    except NotADirectoryError:
        raise BadInput(f"{path}: no such file (a part of the path is not a directory)") from None
    except PermissionError:
        raise BadInput(f"{path}: permission denied (a directory on the way cannot be entered)") from None
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror or error})") from None
    if stat.S_ISDIR(mode):
        raise BadInput(f"{path}: is a directory, not a regular file")
    if not stat.S_ISREG(mode):
        raise BadInput(f"{path}: not a regular file (a pipe, FIFO or device)" + (f": {not_regular_hint}"
                                                                                  if not_regular_hint else ""))
    try:
        # Opening a regular file never blocks (a FIFO would: it was refused above).
        with open(path, "rb"):
            pass
    except PermissionError:
        raise BadInput(f"{path}: permission denied (no read permission)") from None
    except OSError as error:
        raise BadInput(f"{path}: cannot read ({error.strerror or error})") from None
