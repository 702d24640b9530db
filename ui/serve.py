"""Serve the app: ``serve(index)`` binds to 127.0.0.1, optionally behind password authentication
(required to bind beyond this machine, unless ``--allow-unauthenticated``).

The auth file holds one ``user:<hash>`` line per user (``#`` comments allowed); hashes are
salted scrypt strings made by :func:`hash_password`. Create lines without ``radlens``::

    python -m ui.serve hash-password alice >> auth.txt     # asks for the password twice
    python -m ui.serve serve --index data/index --auth-file auth.txt
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import getpass
import hashlib
import hmac
import logging
import math
import os
import secrets
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from vlm.errors import RadLensError

logger = logging.getLogger(__name__)

_SCHEME = "scrypt"
_N, _R, _P = 2**14, 8, 1


_MAXMEM, _DKLEN = 2**26, 32


def _scrypt(password: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(password.encode(), salt=salt, n=n, r=r, p=p, maxmem=_MAXMEM,
                          dklen=_DKLEN)


def _hash_problem(encoded: str) -> str | None:
    """Why ``scrypt$N$r$p$salt$hash`` could never verify a password (None: it can)."""
    parts = encoded.split("$")
    if len(parts) != 6 or parts[0] != _SCHEME:
        return "expected 'user:scrypt$…'"
    try:
        n, r, p = (int(v) for v in parts[1:4])
    except ValueError:
        return "the scrypt parameters N, r, p are not whole numbers"
    # OpenSSL's limits: N a power of two above 1, and its working memory within maxmem
    if n < 2 or n & (n - 1) or r < 1 or p < 1 or 128 * r * (n + p + 2) > _MAXMEM:
        return "the scrypt parameters N, r, p are out of range"
    try:
        base64.b64decode(parts[4], validate=True)
        digest = base64.b64decode(parts[5], validate=True)
    except ValueError:
        return "the salt or hash is not base64"
    if len(digest) != _DKLEN:
        return f"the hash is not {_DKLEN} bytes"
    return None


def hash_password(password: str, *, salt: bytes | None = None) -> str:
    """``scrypt$N$r$p$salt$hash`` (base64) for an auth file line."""
    if not password:
        raise RadLensError("empty password: choose a password")
    salt = salt or secrets.token_bytes(16)
    digest = _scrypt(password, salt, _N, _R, _P)
    b64 = base64.b64encode
    return f"{_SCHEME}${_N}${_R}${_P}${b64(salt).decode()}${b64(digest).decode()}"


def verify_password(password: str, encoded: str) -> bool:
    """True when ``password`` matches a :func:`hash_password` string (constant-time compare)."""
    try:
        scheme, n, r, p, salt, digest = encoded.split("$")
        if scheme != _SCHEME:
            return False
        got = _scrypt(password, base64.b64decode(salt), int(n), int(r), int(p))
        return hmac.compare_digest(got, base64.b64decode(digest))
    except (ValueError, TypeError):
        return False


def load_auth_file(path: str | os.PathLike[str]) -> dict[str, str]:
    """``{user: hash}`` from an auth file; a malformed line is an error naming its number."""
    p = Path(path)
    if not p.is_file():
        raise RadLensError(f"auth file {p} not found: create it with "
                           "'python -m ui.serve hash-password USER >> FILE'")
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise RadLensError(f"auth file {p} cannot be read ({exc.strerror})") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:  # a binary file; say where, never what
        no = data[: exc.start].count(b"\n") + 1
        raise RadLensError(f"auth file {p} line {no}: not UTF-8 text (is it the right "
                           "file?)") from None
    users: dict[str, str] = {}
    for no, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        user, sep, encoded = line.partition(":")
        problem = _hash_problem(encoded.strip()) if sep and user.strip() else "no 'user:'"
        if problem:  # the line itself is never echoed: it may hold a password
            raise RadLensError(f"auth file {p} line {no}: {problem} (make it with "
                               "'python -m ui.serve hash-password USER')")
        users[user.strip()] = encoded.strip()
    if not users:
        raise RadLensError(f"auth file {p} has no users")
    if p.stat().st_mode & 0o077:
        logger.warning("auth file %s is readable by other users: chmod 600 it", p)
    return users


def make_auth(users: Mapping[str, str]) -> Callable[[str, str], bool]:
    """A Gradio ``auth`` callable over ``{user: hash}``."""
    dummy = hash_password(secrets.token_hex(8))

    def check(username: str, password: str) -> bool:
        encoded = users.get(username)
        ok = verify_password(password, encoded or dummy)  # same work for unknown users
        return bool(encoded) and ok

    return check


def thumbs_dir(engine: Any) -> Path:
    """The only folder the server may read files from: the index's thumbnails (catalog,
    vectors and the failures report stay private)."""
    return (Path(engine.index.path) / "thumbs").resolve()


def launch(app: Any, engine: Any, *, host: str = "127.0.0.1", port: int = 7860,
           auth: Callable[[str, str], bool] | None = None, max_upload_mb: float = 50,
           prevent_thread_lock: bool = False, quiet: bool = True) -> Any:
    """Launch a built app with RadLens' theme, the upload limit, and only thumbnails served.
    The engine's index follows what other processes write to it (:meth:`IndexFolder.watch`):
    studies added by ``index add`` appear, and studies erased by ``index remove`` disappear,
    within a few seconds and without a restart."""
    from ui.app import CSS, THEME

    engine.index.watch()
    return app.queue(default_concurrency_limit=4).launch(
        server_name=url_host(host), server_port=port, auth=auth,
        auth_message="RadLens: sign in", allowed_paths=[str(thumbs_dir(engine))],
        # bytes, as build_app counts them (gradio parses "2.5mb" as 2 and then fails on ".5mb")
        max_file_size=int(max_upload_mb * 2**20), theme=THEME, css=CSS, ssr_mode=False,
        show_error=False, quiet=quiet, prevent_thread_lock=prevent_thread_lock, pwa=False,
        enable_monitoring=False, footer_links=[])


def _bare_host(host: str) -> str:
    """``::1`` for ``[::1]`` (the bracketed form of URLs); other hosts as given."""
    host = host.strip()
    return host[1:-1] if host.startswith("[") and host.endswith("]") else host


def url_host(host: str) -> str:
    """The host as a URL spells it: an IPv6 literal in brackets (``[::1]``). Gradio binds to
    the address inside the brackets and builds its own URLs from this form; a bare ``::1``
    made it request ``http://::1:7860/`` and fail with an internal ``InvalidURL``."""
    host = _bare_host(host)
    return f"[{host}]" if ":" in host else host


def is_loopback(host: str) -> bool:
    """True when every address ``host`` names is this machine only (127.x, ::1)."""
    import ipaddress
    import socket

    try:
        infos = socket.getaddrinfo(_bare_host(host), None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(str(info[4][0]).split("%")[0]).is_loopback
                               for info in infos)


def check_port(host: str, port: int) -> None:
    """A one-line error, before any model loads, when the app could not listen on
    ``host:port`` (gradio's own message is an internal-looking ``OSError`` about a "port
    range", after the index and the model were loaded; the demo would first build its
    index)."""
    import errno
    import socket

    if not 1 <= port <= 65535:  # 0 or 80000: internal errors once the model had loaded
        raise RadLensError(f"--port {port}: choose a port from 1 to 65535")
    try:
        infos = socket.getaddrinfo(_bare_host(host), port, type=socket.SOCK_STREAM)
    except OSError as exc:
        raise RadLensError(f"cannot serve on {host}: not a usable address ({exc})") from None
    family, _, _, _, address = infos[0]
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server does
        try:
            sock.bind(address)
        except OSError as exc:
            why = ("is already in use (another RadLens app or demo?)"
                   if exc.errno == errno.EADDRINUSE else f"cannot be used ({exc.strerror})")
            raise RadLensError(f"{url_host(host)}:{port} {why}: pass --port with a free port"
                               ) from None


def private_temp_dir() -> Path:
    """Point gradio's upload and cache folder at a new folder only this user can open (0700),
    removed at exit; a ``GRADIO_TEMP_DIR`` set by the user is kept. Gradio's default is a
    shared ``/tmp/gradio`` whose folders any local user can list and read: uploads under their
    original names and the rendered views of studies."""
    import atexit
    import shutil
    import tempfile

    if os.environ.get("GRADIO_TEMP_DIR"):
        return Path(os.environ["GRADIO_TEMP_DIR"])
    path = Path(tempfile.mkdtemp(prefix="radlens-gradio-"))  # mkdtemp: mode 0700
    os.environ["GRADIO_TEMP_DIR"] = str(path)
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return path


@contextlib.contextmanager
def _stop_on_sigterm() -> Iterator[None]:
    """While the server runs, SIGTERM (a service manager's stop) ends it as Ctrl-C does:
    gradio closes it and the exit handlers run, so :func:`private_temp_dir` is removed
    (SIGTERM's default ends the process without them). The previous handler is restored on
    the way out: left installed, it outlived a test's stubbed server and turned a later
    test's SIGTERM into a KeyboardInterrupt that ended the whole test session."""
    import signal
    import threading

    def stop(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) != signal.SIG_DFL):
        yield
        return
    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def serve(index: str | os.PathLike[str], *, host: str = "127.0.0.1", port: int = 7860,
          auth_file: str | os.PathLike[str] | None = None, model: str | None = None,
          max_upload_mb: float = 50, ingest_roots: Sequence[str] | None = None,
          allow_unauthenticated: bool = False, prevent_thread_lock: bool = False) -> Any:
    """Open ``index`` (with its model, or ``model``) and serve the app until interrupted.

    Every option is checked before the index and the model load. A ``host`` other than this
    machine (``0.0.0.0``, a LAN address) needs ``auth_file`` or ``allow_unauthenticated``.
    """
    if not (math.isfinite(max_upload_mb) and max_upload_mb > 0):
        raise RadLensError(f"--max-upload-mb {max_upload_mb:g}: the upload limit must be a "
                           "number of MB above 0")
    check_port(host, port)
    from index.dicomweb import DicomWeb, is_dicomweb

    for root in ingest_roots or ():
        if is_dicomweb(root):
            DicomWeb(root, environ={})  # a malformed URL or one with credentials: one line now
    auth = make_auth(load_auth_file(auth_file)) if auth_file else None
    if auth is None and not is_loopback(host):
        if not allow_unauthenticated:
            raise RadLensError(f"serving on {host} without --auth-file would let anyone who "
                               "can reach it query the archive: pass --auth-file (or "
                               "--allow-unauthenticated on a trusted network)")
        logger.warning("serving on %s without --auth-file: anyone who can reach it can query "
                       "the archive", host)
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    private_temp_dir()  # before gradio is imported and the app built: both read it
    from index.engine import Engine
    from ui.app import build_app

    engine = Engine.open(index, model=model)
    app = build_app(engine, max_upload_mb=max_upload_mb, ingest_roots=ingest_roots)
    with contextlib.nullcontext() if prevent_thread_lock else _stop_on_sigterm():
        return launch(app, engine, host=host, port=port, auth=auth,
                      max_upload_mb=max_upload_mb, prevent_thread_lock=prevent_thread_lock,
                      quiet=False)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ui.serve", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="cmd", required=True)
    hp = sub.add_parser("hash-password", help="print a 'user:hash' line for an auth file")
    hp.add_argument("user")
    hp.add_argument("--stdin", action="store_true", help="read the password from stdin")
    sp = sub.add_parser("serve", help="serve the app for an index")
    sp.add_argument("--index", required=True)
    sp.add_argument("--host", default="127.0.0.1")
    sp.add_argument("--port", type=int, default=7860)
    sp.add_argument("--auth-file")
    sp.add_argument("--model")
    sp.add_argument("--max-upload-mb", type=float, default=50)
    sp.add_argument("--ingest-root", action="append",
                    help="folder (or DICOMweb service root) the Index tab may build from")
    sp.add_argument("--allow-unauthenticated", action="store_true",
                    help="serve beyond this machine without --auth-file")
    args = parser.parse_args(argv)
    try:
        if args.cmd == "hash-password":
            user = args.user
            # the auth file reads 'user:hash' lines, '#' starts a comment and names are
            # stripped: a newline split the line, '#carol' could never sign in
            if (":" in user or not user.strip() or not user.isprintable()
                    or user.startswith("#") or user != user.strip()):
                raise RadLensError("user names cannot be empty, contain ':' or control "
                                   "characters, start with '#' or with spaces")
            if args.stdin:
                password = sys.stdin.readline().rstrip("\n")
            else:
                password = getpass.getpass("password: ")
                if getpass.getpass("again: ") != password:
                    raise RadLensError("the passwords differ")
            print(f"{args.user}:{hash_password(password)}")
            return 0
        serve(args.index, host=args.host, port=args.port, auth_file=args.auth_file,
              model=args.model, max_upload_mb=args.max_upload_mb, ingest_roots=args.ingest_root,
              allow_unauthenticated=args.allow_unauthenticated)
        return 0
    except RadLensError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
