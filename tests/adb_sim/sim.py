"""A test double for an Android phone: speaks the adb wire protocol as adbd does, over loopback.

The real `adb` client and server connect to it with `adb connect 127.0.0.1:PORT`. It implements
what the device lab uses (see AOSP packages/modules/adb/protocol.txt, SYNC.TXT, SERVICES.TXT):

- the CNXN handshake (or AUTH that never completes, to play an unauthorized phone);
- streams: OPEN / OKAY / WRTE / CLSE with adb's one-message-in-flight flow control;
- `shell:CMD` in the legacy raw protocol (no shell_v2 feature is advertised, so the client sends
  the command and reads plain output; the exit status is not transported, as on old phones);
- `sync:` with STAT / SEND / DATA / DONE / RECV / QUIT.

Shell commands run with /bin/sh on the host inside a sandbox folder that stands in for the phone's
file system: `/data/local/tmp`, `/sys/devices/system/cpu` (each core's cpufreq `cpuinfo_max_freq`,
`scaling_governor` and `related_cpus`) and `/sys/class/thermal` (thermal zones, see `ThermalProfile`)
are mapped into it, and fake `getprop`, `dumpsys`, `df`, `logcat`
and `taskset` answer from the device description (`taskset MASK CMD` checks the mask, logs it to
`taskset.log` in the sandbox and runs CMD unpinned). Runner binaries the
harness pushes (the test runner kit) are host scripts, so they run here as they would on a phone.

It is not a phone: no SELinux, no users, no real CPU frequency; its thermal zones follow a simple
model (each runner execution heats them, they cool towards ambient with time), not silicon.
"""

from __future__ import annotations

import json
import math
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

A_CNXN, A_OPEN, A_OKAY = 0x4E584E43, 0x4E45504F, 0x59414B4F
A_CLSE, A_WRTE, A_AUTH = 0x45534C43, 0x45545257, 0x48545541
A_VERSION = 0x01000001
AUTH_TOKEN, AUTH_SIGNATURE, AUTH_RSAPUBLICKEY = 1, 2, 3
MAX_PAYLOAD = 256 * 1024
SYNC_DATA_MAX = 64 * 1024
HEADER = struct.Struct("<6I")

FAKE_TOOLS = Path(__file__).resolve().parent / "device_bin"
# Paths of a phone that the harness touches, and where they live in the sandbox.
MAPPED_PREFIXES = ("/data/local/tmp", "/sys/devices/system/cpu", "/sys/class/thermal")
# Where the runner kit's stand-ins append how many executions each invocation made (one count a line).
HEAT_LOG = "thermal_runs.log"


@dataclass
class Faults:
    """Faults the simulated phone injects; each one reproduces something real phones do.

    Attributes:
        unauthorized: Answer CNXN with AUTH and never accept a key (the "Allow USB debugging?"
            prompt was never confirmed).
        offline: Accept the TCP connection but never answer CNXN.
        vanish_on_command: Drop the connection and stop listening when a shell command contains
            this text (the cable was pulled).
        drop_pushes: Drop the connection in the middle of this many SEND transfers, then accept
            reconnection (a flaky cable or hub).
        free_kb: Free space `df` reports, in KiB (None: plenty).
        write_quota_kb: SEND fails with "No space left on device" once this much was written, in KiB
            (another app filled the storage after `df` was read).
        hang: Runner names (e.g. "executor_runner") that never finish.
        crash: Runner names that die with SIGSEGV after printing to stderr.
        battery_temp_tenths: Battery temperature `dumpsys battery` reports, in tenths of a degree C.
        cool_after_reads: The battery reads cool (25 C) after this many `dumpsys battery` calls.
    """

    unauthorized: bool = False
    offline: bool = False
    vanish_on_command: str | None = None
    drop_pushes: int = 0
    free_kb: int | None = None
    write_quota_kb: int | None = None
    hang: list[str] = field(default_factory=list)
    crash: list[str] = field(default_factory=list)
    battery_temp_tenths: int = 301
    cool_after_reads: int | None = None


@dataclass
class ThermalProfile:
    """How the simulated phone's thermal zones (`/sys/class/thermal/thermal_zoneN/{type,temp}`) behave.

    One excess temperature over ambient drives every zone: each runner execution (warm-up or timed, as the
    stand-ins count them) adds `heat_per_run_c` to it, and it decays as Newton's law of cooling has it,
    by a factor e every `cooling_tau_s` seconds. A zone reads ambient + its share of the excess, in
    millidegrees C as the kernel writes it.

    Attributes:
        ambient_c: Temperature the phone cools towards.
        start_c: Excess-driven temperature at power-on (None: ambient).
        heat_per_run_c: Degrees C one runner execution adds (0: the zones stay where they are).
        cooling_tau_s: Time constant of the cooling, in seconds.
        zones: (type, share of the excess) per zone, in zone order; a share of None is a zone whose `temp`
            cannot be read (`cat` fails, as with some vendor sensors).
    """

    ambient_c: float = 30.0
    start_c: float | None = None
    heat_per_run_c: float = 0.0
    cooling_tau_s: float = 20.0
    zones: tuple[tuple[str, float | None], ...] = (("cpu-0-0-usr", 0.8), ("cpu-1-0-usr", 1.0), ("battery", 0.2),
                                                   ("skin-therm", 0.3), ("tsens_tz_sensor9", None))


@dataclass
class DeviceProfile:
    """What `getprop` says about the simulated phone."""

    model: str = "Pixel Sim"
    soc: str = "Tensor G-sim"
    abi: str = "arm64-v8a"
    android: str = "14"
    sdk: str = "34"
    # Cores as (max kHz, governor), one per CPU, in cluster order: 4 little, 3 mid, 1 big, as on a
    # recent big.LITTLE phone (the big core's governor differs so that per-cluster logging shows).
    cpus: tuple[tuple[int, str], ...] = ((1_800_000, "schedutil"),) * 4 + ((2_400_000, "schedutil"),) * 3 + (
        (3_000_000, "performance"),)
    thermal: ThermalProfile = field(default_factory=ThermalProfile)

    def props(self) -> dict[str, str]:
        return {
            "ro.product.model": self.model, "ro.product.name": "sim", "ro.product.device": "sim",
            "ro.soc.model": self.soc, "ro.board.platform": "simboard", "ro.product.cpu.abi": self.abi,
            "ro.build.version.release": self.android, "ro.build.version.sdk": self.sdk,
        }


def checksum(data: bytes) -> int:
    return sum(data) & 0xFFFFFFFF


def pack(command: int, arg0: int, arg1: int, data: bytes = b"") -> bytes:
    return HEADER.pack(command, arg0, arg1, len(data), checksum(data), command ^ 0xFFFFFFFF) + data


class Connection:
    """One adb transport (the TCP connection from the adb server) and its streams."""

    def __init__(self, device: SimulatedDevice, sock: socket.socket) -> None:
        self.device = device
        self.sock = sock
        self.send_lock = threading.Lock()
        self.streams: dict[int, Stream] = {}
        self.next_id = 1
        self.max_payload = MAX_PAYLOAD
        self.closed = threading.Event()

    def send(self, command: int, arg0: int, arg1: int, data: bytes = b"") -> None:
        with self.send_lock:
            try:
                self.sock.sendall(pack(command, arg0, arg1, data))
            except OSError:
                self.close()

    def close(self) -> None:
        if self.closed.is_set():
            return
        self.closed.set()
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
        for stream in list(self.streams.values()):
            stream.remote_closed()

    def _read_exact(self, size: int) -> bytes:
        chunks = []
        while size:
            chunk = self.sock.recv(size)
            if not chunk:
                raise ConnectionError("adb server closed the connection")
            chunks.append(chunk)
            size -= len(chunk)
        return b"".join(chunks)

    def serve(self) -> None:
        try:
            while not self.closed.is_set():
                command, arg0, arg1, length, _, _ = HEADER.unpack(self._read_exact(HEADER.size))
                data = self._read_exact(length) if length else b""
                self._dispatch(command, arg0, arg1, data)
        except (OSError, ConnectionError):
            pass
        finally:
            self.close()

    def _dispatch(self, command: int, arg0: int, arg1: int, data: bytes) -> None:
        faults = self.device.faults
        if command == A_CNXN:
            self.max_payload = min(MAX_PAYLOAD, arg1)
            if faults.offline:
                return
            if faults.unauthorized:
                self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(20))
                return
            banner = ";".join(f"{k}={v}" for k, v in self.device.profile.props().items()
                              if k in ("ro.product.name", "ro.product.model", "ro.product.device"))
            # No "shell_v2" or "stat_v2" feature: the client falls back to the legacy protocols.
            self.send(A_CNXN, A_VERSION, MAX_PAYLOAD, f"device::{banner};features=cmd".encode())
        elif command == A_AUTH:
            # A real phone answers a rejected signature with a new token and waits on the user
            # for a public key; this one never gets an answer.
            if arg0 == AUTH_SIGNATURE:
                self.send(A_AUTH, AUTH_TOKEN, 0, os.urandom(20))
        elif command == A_OPEN:
            local_id = self.next_id
            self.next_id += 1
            stream = Stream(self, local_id, arg0)
            self.streams[local_id] = stream
            self.send(A_OKAY, local_id, arg0)
            threading.Thread(target=stream.run, args=(data.rstrip(b"\0").decode(),), daemon=True).start()
        elif command == A_WRTE:
            stream = self.streams.get(arg1)
            if stream is not None:
                self.send(A_OKAY, arg1, arg0)
                stream.inbox.put(data)
        elif command == A_OKAY:
            stream = self.streams.get(arg1)
            if stream is not None:
                stream.can_write.set()
        elif command == A_CLSE:
            stream = self.streams.pop(arg1, None)
            if stream is not None:
                stream.remote_closed()


class Stream:
    """One adb stream (a service the server opened) with its inbox and flow control."""

    def __init__(self, connection: Connection, local_id: int, remote_id: int) -> None:
        self.connection = connection
        self.local_id = local_id
        self.remote_id = remote_id
        self.inbox: queue.Queue[bytes | None] = queue.Queue()
        self.can_write = threading.Event()
        self.can_write.set()
        self.closed = threading.Event()
        self.buffer = b""

    def remote_closed(self) -> None:
        self.closed.set()
        self.can_write.set()
        self.inbox.put(None)

    def write(self, data: bytes) -> None:
        step = self.connection.max_payload
        for start in range(0, len(data), step):
            while not self.can_write.wait(0.5):
                if self.connection.closed.is_set():
                    raise ConnectionError("transport closed")
            if self.closed.is_set():
                raise ConnectionError("stream closed by the client")
            self.can_write.clear()
            self.connection.send(A_WRTE, self.local_id, self.remote_id, data[start : start + step])

    def read(self, size: int) -> bytes:
        while len(self.buffer) < size:
            chunk = self.inbox.get()
            if chunk is None:
                raise ConnectionError("stream closed by the client")
            self.buffer += chunk
        data, self.buffer = self.buffer[:size], self.buffer[size:]
        return data

    def finish(self) -> None:
        if not self.closed.is_set():
            self.closed.set()
            self.connection.streams.pop(self.local_id, None)
            self.connection.send(A_CLSE, self.local_id, self.remote_id)

    def run(self, service: str) -> None:
        try:
            if service.startswith("shell:"):
                self.connection.device.shell(self, service[len("shell:"):])
            elif service == "sync:":
                self.connection.device.sync(self)
            else:
                self.write(f"FAIL unknown service {service}".encode())
        except ConnectionError:
            pass
        finally:
            self.finish()


class SimulatedDevice:
    """A phone on 127.0.0.1:`port` whose file system is the folder `root`.

    Args:
        root: Sandbox folder standing in for the phone's file system (created).
        profile: What getprop reports.
        faults: Faults to inject.
        port: TCP port to listen on (0: any free port).
        runtime_socket: Unix socket of a `RuntimeService` that the test runner kit's stand-ins call.
    """

    def __init__(self, root: Path, profile: DeviceProfile | None = None, faults: Faults | None = None,
                 port: int = 0, runtime_socket: Path | None = None) -> None:
        self.root = root.resolve()
        self.runtime_socket = runtime_socket
        self.profile = profile or DeviceProfile()
        self.faults = faults or Faults()
        self.commands: list[str] = []
        self.pushes_dropped = 0
        self.bytes_written = 0
        self.lock = threading.Lock()
        self.connections: list[Connection] = []
        for prefix in MAPPED_PREFIXES:
            (self.root / prefix.lstrip("/")).mkdir(parents=True, exist_ok=True)
        self._write_cpus()
        thermal = self.profile.thermal
        self.excess_c = (thermal.start_c if thermal.start_c is not None else thermal.ambient_c) - thermal.ambient_c
        self.excess_at = time.monotonic()
        self.runs_heated = 0
        self.update_thermal()
        self._write_state()
        self.listener = socket.create_server(("127.0.0.1", port))
        self.port = self.listener.getsockname()[1]
        self.serial = f"127.0.0.1:{self.port}"
        self._accepting = threading.Thread(target=self._accept, daemon=True)
        self._accepting.start()

    def _write_cpus(self) -> None:
        """cpuN/cpufreq/{cpuinfo_max_freq,scaling_governor,related_cpus}; a cluster is a run of equal max kHz."""
        cpus = self.profile.cpus
        for index, (khz, governor) in enumerate(cpus):
            folder = self.root / f"sys/devices/system/cpu/cpu{index}/cpufreq"
            folder.mkdir(parents=True, exist_ok=True)
            related = [i for i, (other, _) in enumerate(cpus) if other == khz]
            (folder / "cpuinfo_max_freq").write_text(f"{khz}\n")
            (folder / "scaling_governor").write_text(f"{governor}\n")
            (folder / "related_cpus").write_text(" ".join(str(i) for i in related) + "\n")

    def update_thermal(self) -> None:
        """Bring the thermal zones up to now: cool for the time passed, heat for the executions the runner
        stand-ins logged since the last update, and rewrite every zone's `temp`."""
        thermal = self.profile.thermal
        with self.lock:
            log = self.root / HEAT_LOG
            runs = 0
            if log.exists():
                runs = sum(int(line) for line in log.read_text().split())
                log.unlink()
            now = time.monotonic()
            self.excess_c *= math.exp(-(now - self.excess_at) / thermal.cooling_tau_s)
            self.excess_at = now
            self.excess_c += runs * thermal.heat_per_run_c
            self.runs_heated += runs
            for index, (kind, share) in enumerate(thermal.zones):
                folder = self.root / f"sys/class/thermal/thermal_zone{index}"
                folder.mkdir(parents=True, exist_ok=True)
                (folder / "type").write_text(f"{kind}\n")
                if share is None:
                    # A folder where the file should be: `cat` fails, as an unreadable vendor sensor does.
                    (folder / "temp").mkdir(exist_ok=True)
                else:
                    millidegrees = round(1000 * (thermal.ambient_c + share * self.excess_c))
                    (folder / "temp").write_text(f"{millidegrees}\n")

    def zone_c(self, kind: str) -> float:
        """What zone `kind` reads now, in degrees C."""
        self.update_thermal()
        index = [zone for zone, _ in self.profile.thermal.zones].index(kind)
        return int((self.root / f"sys/class/thermal/thermal_zone{index}/temp").read_text()) / 1000

    def _write_state(self) -> None:
        """The files the fake device tools and the test runner kit read."""
        state = {"props": self.profile.props(), "faults": {"hang": self.faults.hang, "crash": self.faults.crash},
                 "free_kb": self.faults.free_kb, "battery_temp_tenths": self.faults.battery_temp_tenths,
                 "cool_after_reads": self.faults.cool_after_reads}
        (self.root / "sim_state.json").write_text(json.dumps(state))

    def _accept(self) -> None:
        while True:
            try:
                sock, _ = self.listener.accept()
            except OSError:
                return
            connection = Connection(self, sock)
            self.connections.append(connection)
            threading.Thread(target=connection.serve, daemon=True).start()

    def vanish(self) -> None:
        """The phone is gone: connections dropped, nothing listens any more."""
        self.listener.close()
        for connection in self.connections:
            connection.close()

    def stop(self) -> None:
        self.vanish()

    def host_path(self, device_path: str) -> Path:
        """Where a phone path lives in the sandbox; refuses paths outside the mapped folders."""
        if not device_path.startswith(MAPPED_PREFIXES):
            raise PermissionError(f"{device_path}: outside the simulated phone's mapped folders")
        return self.root / device_path.lstrip("/")

    def _to_host(self, text: str) -> str:
        for prefix in MAPPED_PREFIXES:
            text = text.replace(prefix, f"{self.root}{prefix}")
        return text

    def _to_device(self, data: bytes) -> bytes:
        return data.replace(str(self.root).encode(), b"")

    def shell(self, stream: Stream, command: str) -> None:
        with self.lock:
            self.commands.append(command)
        if self.faults.vanish_on_command and self.faults.vanish_on_command in command:
            self.vanish()
            return
        self.update_thermal()
        env = {**os.environ, "PATH": f"{FAKE_TOOLS}:{os.environ['PATH']}", "SIM_ROOT": str(self.root),
               "SIM_PYTHON": sys.executable, "SIM_RUNTIME_SOCKET": str(self.runtime_socket or "")}
        process = subprocess.Popen(["/bin/sh", "-c", self._to_host(command)], cwd=self.root, env=env,
                                   stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                   start_new_session=True)

        def kill_when_closed() -> None:
            # adbd kills the command when the client goes away (e.g. the harness timed out).
            while stream.inbox.get() is not None:
                pass
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)

        threading.Thread(target=kill_when_closed, daemon=True).start()
        assert process.stdout is not None
        try:
            while chunk := os.read(process.stdout.fileno(), 65536):
                stream.write(self._to_device(chunk))
        finally:
            process.stdout.close()
            process.wait()
            self.update_thermal()

    def sync(self, stream: Stream) -> None:
        while True:
            request, length = struct.unpack("<4sI", stream.read(8))
            if request == b"QUIT":
                return
            path = stream.read(length).decode()
            if request == b"STAT":
                self._stat(stream, path)
            elif request == b"SEND":
                self._receive_file(stream, path)
            elif request == b"RECV":
                self._send_file(stream, path)
            else:
                self._fail(stream, f"unsupported sync request {request!r}")
                return

    def _fail(self, stream: Stream, message: str) -> None:
        stream.write(b"FAIL" + struct.pack("<I", len(message)) + message.encode())

    def _stat(self, stream: Stream, path: str) -> None:
        try:
            info = os.stat(self.host_path(path))
            values = (info.st_mode, info.st_size, int(info.st_mtime))
        except (OSError, PermissionError):
            values = (0, 0, 0)
        stream.write(b"STAT" + struct.pack("<3I", *values))

    def _receive_file(self, stream: Stream, spec: str) -> None:
        path, _, mode = spec.rpartition(",")
        chunks, received = [], 0
        with self.lock:
            drop = self.pushes_dropped < self.faults.drop_pushes
            if drop:
                self.pushes_dropped += 1
        while True:
            request, length = struct.unpack("<4sI", stream.read(8))
            if request == b"DONE":
                break
            if request != b"DATA":
                self._fail(stream, f"expected DATA, got {request!r}")
                return
            chunks.append(stream.read(length))
            received += length
            if drop:
                # The cable goes mid-transfer; the phone comes back for the next connection.
                stream.connection.close()
                raise ConnectionError("push dropped by fault injection")
        quota_kb = self.faults.write_quota_kb
        with self.lock:
            self.bytes_written += received
            full = quota_kb is not None and self.bytes_written > quota_kb * 1024
        if full:
            self._fail(stream, f"write failed: No space left on device ({path})")
            return
        try:
            target = self.host_path(path)
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(b"".join(chunks))
            os.chmod(target, int(mode) & 0o777)
        except OSError as error:
            self._fail(stream, f"{path}: {error.strerror}")
            return
        stream.write(b"OKAY" + struct.pack("<I", 0))

    def _send_file(self, stream: Stream, path: str) -> None:
        try:
            data = self.host_path(path).read_bytes()
        except (OSError, PermissionError):
            self._fail(stream, f"remote object '{path}' does not exist")
            return
        for start in range(0, len(data), SYNC_DATA_MAX):
            chunk = data[start : start + SYNC_DATA_MAX]
            stream.write(b"DATA" + struct.pack("<I", len(chunk)) + chunk)
        stream.write(b"DONE" + struct.pack("<I", 0))

