"""Start a command the way systemd starts a socket-activated service.

The descriptors named on the command line become 3, 4, ... in the command, and LISTEN_FDS,
LISTEN_PID (this process: exec keeps the pid) and LISTEN_FDNAMES describe them.

usage: python tests/sd_launch.py NAME=FD [NAME=FD ...] -- COMMAND [ARG ...]
"""

from __future__ import annotations

import fcntl
import os
import sys

SD_LISTEN_FDS_START = 3


def main(argv: list[str]) -> None:
    split = argv.index("--")
    pairs = [arg.split("=", 1) for arg in argv[:split]]
    command = argv[split + 1:]
    names = [name for name, _ in pairs]
    # Park every descriptor above the target range first, so no dup2 overwrites one not yet moved.
    parked = [fcntl.fcntl(int(fd), fcntl.F_DUPFD, 100) for _, fd in pairs]
    for _, fd in pairs:
        os.close(int(fd))
    for index, fd in enumerate(parked):
        os.dup2(fd, SD_LISTEN_FDS_START + index, inheritable=True)
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(parked)), LISTEN_PID=str(os.getpid()), LISTEN_FDNAMES=":".join(names))
    os.execvp(command[0], command)


if __name__ == "__main__":
    main(sys.argv[1:])
