"""``qfine studio``: the local web app (:mod:`qfine.studio`), served by uvicorn."""

from __future__ import annotations

import ipaddress
import os
import secrets
import socket
from pathlib import Path

from qfine.util.errors import QfineError


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the studio on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0: any free one), bound before the address is printed."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host.strip("[]"), port))
    except OSError as e:
        sock.close()
        raise QfineError(f"cannot listen on {host}:{port}: {e.strerror}; pick another --port") from None
    sock.listen(128)
    return sock


def cmd_studio(ns) -> None:
    import uvicorn

    from qfine.studio.app import Settings, build

    data = [Path(d).resolve() for d in (ns.data or [os.getcwd()])]
    for d in data:
        if not d.is_dir():
            raise QfineError(f"--data {d}: not a folder")
    token = None
    if not is_loopback(ns.host):
        token = os.environ.get("QFINE_STUDIO_TOKEN") or secrets.token_urlsafe(24)
    settings = Settings(runs=Path(ns.runs).resolve(), data=data, host=ns.host, port=ns.port, token=token,
                        max_upload=int(ns.max_upload * 2**20))
    app = build(settings)
    sock = _bind(ns.host, ns.port)
    port = sock.getsockname()[1]
    shown = f"[{ns.host.strip('[]')}]" if ":" in ns.host else ns.host
    print(f"qfine studio: runs {settings.runs}; data {', '.join(map(str, data))}", flush=True)
    if token:
        print(f"qfine studio: http://{shown}:{port}/?token={token}\n"
              "  (this address is reachable from other machines: the token is required on every request; "
              "it is printed once)", flush=True)
    else:
        print(f"qfine studio: http://{shown}:{port}/", flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    server.run(sockets=[sock])


def register(sub) -> None:
    p = sub.add_parser("studio", help="local web app: runs, live curves, launch/stop/resume, chat, export",
                       description="Serve the studio on this machine (127.0.0.1 by default). On any other "
                       "address a random access token is required and printed once. The browser reads and writes "
                       "only under --runs and the --data folders.")
    p.add_argument("--runs", default="runs", help="the runs root: run folders live here (default: ./runs)")
    p.add_argument("--data", action="append", metavar="DIR",
                   help="a folder whose data files the form may use (repeatable; default: the current folder); "
                        "uploads go to the first one's uploads/")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860, help="port (0: any free one; the address is printed)")
    p.add_argument("--max-upload", type=float, default=256, metavar="MIB", help="largest upload, in MiB")
    p.set_defaults(func=cmd_studio)
