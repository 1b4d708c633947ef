"""Unix listening sockets created 0600 without a window where they are not."""

from __future__ import annotations

import os
import socket
import stat


def unix_listen(path: str, backlog: int = 4) -> socket.socket:
    """Bind ``path`` (replacing a stale socket) with mode 0600.

    The socket is bound in a fresh 0700 directory next to ``path``, chmod'ed,
    put to listen, then renamed into place, so no other user can ever connect to it and the
    process umask is never touched (other threads may be creating files).
    """
    path = os.path.abspath(path)
    try:
        st = os.lstat(path)
        if not stat.S_ISSOCK(st.st_mode):
            raise FileExistsError(f"{path} exists and is not a socket")
        os.unlink(path)
    except FileNotFoundError:
        pass
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    tmpdir = os.path.join(os.path.dirname(path), f".minivmm-{os.getpid()}-{os.urandom(6).hex()}")
    os.mkdir(tmpdir, 0o700)
    tmp = os.path.join(tmpdir, "s")
    try:
        sock.bind(tmp)
        os.chmod(tmp, 0o600)
        sock.listen(backlog)  # so that once ``path`` exists, connecting to it works
        os.rename(tmp, path)
    except BaseException:
        sock.close()
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    finally:
        os.rmdir(tmpdir)
    return sock


def check_listening_fd(fd: int) -> int:
    """``fd=N`` options: the number must name a listening stream socket this process holds."""
    try:
        probe = socket.socket(fileno=os.dup(fd))
    except OSError as e:
        raise OSError(e.errno, f"fd {fd} is not an open socket ({e.strerror})") from None
    with probe:
        if probe.type != socket.SOCK_STREAM or not probe.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise OSError(0, f"fd {fd} is not a listening stream socket")
    return fd
