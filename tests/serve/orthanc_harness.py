"""Start a real Orthanc (DICOMweb plugin, authentication on) reachable on loopback only, for the PACS tests.

Orthanc has no listen-address setting and binds every interface, so it runs in a private network namespace
(``unshare -n``, then ``ip link set lo up``): inside, it answers on 127.0.0.1; outside, nothing can reach it.
Clients run in the same namespace through ``nsenter -t PID -n`` (:meth:`OrthancServer.run`). Ports are fixed:
the namespace is ours alone, so they never collide with anything on the machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

ORTHANC_PATHS = ("Orthanc", "/usr/sbin/Orthanc")
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")
HTTP_PORT, DICOM_PORT, MOVE_PORT = 8042, 4242, 11113
ORTHANC_AET, OUR_AET = "ORTHANC", "MEDLENS"


def orthanc_binary() -> str | None:
    """Path of the Orthanc executable, or None."""
    for name in ORTHANC_PATHS:
        found = shutil.which(name)
        if found:
            return found
    return None


def unavailable_reason() -> str | None:
    """Why a real Orthanc cannot run here (missing package, no namespaces), or None when it can."""
    if orthanc_binary() is None:
        return "Orthanc is not installed (apt-get install orthanc orthanc-dicomweb; .ci/run does it)"
    if not DICOMWEB_PLUGIN.exists():
        return f"the Orthanc DICOMweb plugin is missing ({DICOMWEB_PLUGIN}; apt-get install orthanc-dicomweb)"
    for tool in ("unshare", "nsenter", "ip"):
        if shutil.which(tool) is None:
            return f"'{tool}' is missing (util-linux/iproute2): cannot isolate Orthanc in a network namespace"
    probe = subprocess.run(
        ["unshare", "-n", "sh", "-c", "ip link set lo up"], capture_output=True, text=True, timeout=10
    )
    if probe.returncode != 0:
        why = probe.stderr.strip().splitlines()[-1] if probe.stderr.strip() else f"exit {probe.returncode}"
        return (
            f"cannot create a private network namespace (unshare -n: {why}; needs root or CAP_SYS_ADMIN): "
            "Orthanc would listen on every interface, so the test does not start it"
        )
    return None


@dataclass
class OrthancServer:
    """A running Orthanc in its own network namespace."""

    process: subprocess.Popen[bytes]
    storage: Path
    user: str
    password: str
    log: Path

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        """The DICOMweb root, as seen from inside the namespace."""
        return f"http://127.0.0.1:{HTTP_PORT}/dicom-web"

    def config_file(self, folder: Path, *, retrieve: str = "get") -> Path:
        """A medlens PACS config (TOML) for this server, without the password (pass it in the environment)."""
        path = folder / "pacs.toml"
        path.write_text(
            f'[dicomweb]\nurl = "{self.url}"\nauth = "basic"\nusername = "{self.user}"\ntimeout = 20\n\n'
            f'[dimse]\nhost = "127.0.0.1"\nport = {DICOM_PORT}\ncalled_aet = "{ORTHANC_AET}"\n'
            f'calling_aet = "{OUR_AET}"\nretrieve = "{retrieve}"\nmove_port = {MOVE_PORT}\ntimeout = 20\n'
        )
        return path

    def run(
        self, args: Sequence[str], *, env: dict[str, str] | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run a command inside Orthanc's network namespace; returns the finished process (text output)."""
        full_env = {**os.environ, **(env or {})}
        return subprocess.run(
            ["nsenter", "-t", str(self.pid), "-n", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=full_env,
        )

    def medlens(
        self, *args: str, password: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """``python -m medlens.cli ARGS`` inside the namespace, the password in the environment (not argv)."""
        env = {
            "MEDLENS_PACS_PASSWORD": self.password if password is None else password,
            "OMP_NUM_THREADS": "1",
            "COLUMNS": "400",
        }
        return self.run([sys.executable, "-m", "medlens.cli", *args], env=env, timeout=timeout)

    def stop(self) -> None:
        """Kill Orthanc: a graceful stop takes about 3 s and its storage is thrown away anyway."""
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)


def _orthanc_config(storage: Path, user: str, password: str) -> dict[str, object]:
    return {
        "Name": "medlens-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": HTTP_PORT,
        "DicomPort": DICOM_PORT,
        "DicomAet": ORTHANC_AET,
        "RemoteAccessAllowed": True,  # "remote" is the namespace's loopback; nothing else can reach it
        "AuthenticationEnabled": True,
        "RegisteredUsers": {user: password},
        "Plugins": [str(DICOMWEB_PLUGIN)],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/"},
        "DicomModalities": {"medlens": [OUR_AET, "127.0.0.1", MOVE_PORT]},
        "DicomCheckCalledAet": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "HttpCompressionEnabled": False,
    }


_WAIT_FOR_PORTS = """
import socket, sys, time
deadline = time.monotonic() + float(sys.argv[1])
for port in map(int, sys.argv[2:]):
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            break
        except OSError:
            if time.monotonic() > deadline:
                sys.exit(f"port {port} not open")
            time.sleep(0.05)
"""


@contextmanager
def orthanc(
    folder: Path, *, user: str = "medlens", password: str = "Orthanc-pw-7f3a9c"
) -> Iterator[OrthancServer]:
    """Run Orthanc (storage under ``folder``) for the duration of the block; stop it afterwards."""
    binary = orthanc_binary()
    if binary is None:
        raise RuntimeError("Orthanc is not installed")
    storage = folder / "orthanc-db"
    storage.mkdir(parents=True, exist_ok=True)
    cfg = folder / "orthanc.json"
    cfg.write_text(json.dumps(_orthanc_config(storage, user, password), indent=2))
    log = folder / "orthanc.log"
    with open(log, "wb") as log_fh:
        process = subprocess.Popen(  # unshare and sh exec: the Popen pid is Orthanc's
            ["unshare", "-n", "sh", "-c", f'ip link set lo up && exec "{binary}" "{cfg}"'],
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    server = OrthancServer(process, storage, user, password, log)
    try:
        t0 = time.monotonic()
        while True:  # nsenter needs the namespace to exist: wait for sh to have exec'd Orthanc
            if process.poll() is not None:
                raise RuntimeError(f"Orthanc exited at start: {log.read_text()[-2000:]}")
            if "Orthanc" in Path(f"/proc/{process.pid}/comm").read_text():
                break
            if time.monotonic() - t0 > 10:
                raise RuntimeError("Orthanc did not start within 10 s")
            time.sleep(0.02)
        ready = server.run([sys.executable, "-c", _WAIT_FOR_PORTS, "15", str(HTTP_PORT), str(DICOM_PORT)])
        if ready.returncode != 0:
            raise RuntimeError(f"Orthanc did not open its ports: {ready.stderr} {log.read_text()[-2000:]}")
        yield server
    finally:
        server.stop()
