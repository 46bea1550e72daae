"""A real nginx in front of gRPC servers, on loopback: configuration and process."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from bench import serving
from tests.deploy import procs

SBIN_PATH = f"{os.environ.get('PATH', '')}{os.pathsep}/usr/sbin{os.pathsep}/usr/local/sbin"

# The essentials are the ones docs/deploy.md shows.
CONFIG = """\
daemon off;
master_process on;
worker_processes 1;
{user}
pid {dir}/nginx.pid;
error_log {dir}/error.log info;

events {{
    worker_connections 1024;
}}

http {{
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;

    # one line per call: which replicas were tried, and the gRPC status of the last one
    log_format grpc '$request_uri|$status|$upstream_addr|$upstream_status|'
                    '$upstream_http_grpc_status$upstream_trailer_grpc_status';
    access_log {dir}/access.log grpc;

    upstream resnet_serve {{
{servers}
        keepalive 32;
    }}

    server {{
        listen 127.0.0.1:{port} http2;
        location / {{
            grpc_pass grpc://resnet_serve;
            # A replica that is gone, refusing connections or refusing streams
            # (draining): try the next one. Classify is a pure function, so
            # retrying it after it was sent is safe (non_idempotent).
            grpc_next_upstream error timeout non_idempotent;
            grpc_next_upstream_tries 3;
            grpc_connect_timeout 2s;
            grpc_read_timeout 120s;
            grpc_send_timeout 120s;
        }}
    }}
}}
"""


def find() -> str | None:
    return shutil.which("nginx", path=SBIN_PATH)


def config(directory: Path, port: int, upstreams: list[str]) -> str:
    # As root, nginx would hand its workers to `nobody`; keep them as the current user.
    user = f"user {pwd.getpwuid(os.geteuid()).pw_name};" if os.geteuid() == 0 else ""
    servers = "\n".join(
        f"        server {address} max_fails=1 fail_timeout=5s;" for address in upstreams
    )
    return CONFIG.format(dir=directory, port=port, servers=servers, user=user)


@dataclass
class Nginx:
    process: subprocess.Popen[bytes]
    address: str
    directory: Path

    def access_log(self) -> list[str]:
        path = self.directory / "access.log"
        return path.read_text().splitlines() if path.exists() else []

    def answered(self, skip: int = 0) -> Counter[str]:
        """gRPC calls answered OK, by the replica that answered them (the last one tried),
        from the access log, leaving out its first `skip` lines."""
        answered: Counter[str] = Counter()
        for line in self.access_log()[skip:]:
            _uri, _status, tried, _statuses, grpc_status = line.split("|")
            if grpc_status.replace("-", "") == "0":  # nginx logs an unset variable as "-"
                answered[tried.split(",")[-1].strip()] += 1
        return answered

    def error_log(self) -> str:
        path = self.directory / "error.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def stop(self) -> int:
        return procs.stop(self.process, limit=30)


def start(directory: Path, upstreams: list[str]) -> Nginx:
    exe = find()
    assert exe is not None
    directory.mkdir(parents=True, exist_ok=True)
    port = serving.free_port()
    conf = directory / "nginx.conf"
    conf.write_text(config(directory, port, upstreams))
    check = subprocess.run(
        [exe, "-t", "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert check.returncode == 0, check.stderr
    with (directory / "nginx.out").open("wb") as out:
        process = subprocess.Popen(
            [exe, "-p", str(directory), "-c", str(conf), "-e", str(directory / "error.log")],
            stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    server = Nginx(process, f"127.0.0.1:{port}", directory)

    def listening() -> bool:
        with socket.socket() as sock:
            return sock.connect_ex(("127.0.0.1", port)) == 0

    procs.wait_until(listening, process, "nginx listening", limit=30)
    return server
