"""The real `adb` client, driven as a subprocess: device listing, shell with exit codes, push, pull.

Nothing here speaks USB or the adb wire protocol itself; the client and its server do. The server
port is configurable (`adb -P PORT`) so a lab, or a test, can run a private adb server.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

# Appended to every shell command: without the shell_v2 protocol (older phones, some adbd
# builds, and the test simulator) `adb shell` always exits 0 and the command's status is lost.
EXIT_MARKER = "__MH_EXIT__="
_EXIT_LINE = re.compile(rf"{EXIT_MARKER}(\d+)\s*$")


class AdbError(Exception):
    """adb itself failed: no client, no server, or the device is gone, offline or unauthorized."""


class DeviceGone(AdbError):
    """The device vanished, went offline or is unauthorized while it was being used."""


@dataclass
class DeviceEntry:
    """One line of `adb devices`: a serial and its state (device, unauthorized, offline, ...)."""

    serial: str
    state: str


@dataclass
class ShellResult:
    """A finished shell command: its exit status and its output (stdout and stderr together)."""

    exit_code: int
    output: str


class ShellTimeout(AdbError):
    """A shell command ran past its timeout; the adb client was killed."""


def find_adb(explicit: str | None = None) -> str:
    """The adb client to use: `explicit`, else `$ADB`, else `adb` on PATH; a clear error if none."""
    candidate = explicit or os.environ.get("ADB") or "adb"
    resolved = shutil.which(candidate)
    if resolved is None:
        raise AdbError(f"adb client not found ({candidate!r}); install it (Debian/Ubuntu: `apt-get install -y adb`, "
                       "or Android SDK platform-tools) or pass --adb PATH / set $ADB")
    return resolved


_GONE_PATTERNS = ("not found", "offline", "unauthorized", "no devices", "device still authorizing",
                  "closed", "protocol fault", "connection reset", "broken pipe")


class Adb:
    """The adb client at `executable`, talking to the adb server on `port` (None: adb's default 5037).

    Args:
        executable: Path or name of the adb client.
        port: adb server port (`adb -P`).
    """

    def __init__(self, executable: str | None = None, port: int | None = None) -> None:
        self.executable = find_adb(executable)
        self.port = port

    def command(self, *args: str) -> list[str]:
        return [self.executable, *(["-P", str(self.port)] if self.port else []), *args]

    def run(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
        """Run one adb command; raises `ShellTimeout` past `timeout` seconds (the client is killed)."""
        try:
            return subprocess.run(self.command(*args), capture_output=True, text=True, timeout=timeout,
                                  stdin=subprocess.DEVNULL, errors="replace")
        except subprocess.TimeoutExpired:
            raise ShellTimeout(f"`adb {' '.join(args)[:120]}` did not finish in {timeout:g} s") from None

    def start_server(self) -> None:
        result = self.run("start-server", timeout=30)
        if result.returncode != 0:
            raise AdbError(f"could not start the adb server: {result.stderr.strip()}")

    def kill_server(self) -> None:
        self.run("kill-server", timeout=30)

    def connect(self, address: str) -> str:
        """`adb connect ADDRESS` (network devices); returns what adb printed."""
        result = self.run("connect", address, timeout=30)
        text = (result.stdout + result.stderr).strip()
        if result.returncode != 0 or "unable" in text or "failed" in text:
            raise AdbError(f"adb connect {address}: {text}")
        return text

    def devices(self) -> list[DeviceEntry]:
        """Every device the server knows, in any state (device, unauthorized, offline, ...)."""
        result = self.run("devices", timeout=30)
        if result.returncode != 0:
            raise AdbError(f"`adb devices` failed: {result.stderr.strip()}")
        entries = []
        for line in result.stdout.splitlines()[1:]:
            parts = line.split()
            if len(parts) >= 2:
                entries.append(DeviceEntry(parts[0], parts[1]))
        return entries


class Device:
    """One device, by serial, through an `Adb` client."""

    def __init__(self, adb: Adb, serial: str) -> None:
        self.adb = adb
        self.serial = serial

    def _check(self, result: subprocess.CompletedProcess[str], what: str) -> None:
        if result.returncode == 0:
            return
        message = (result.stderr or result.stdout).strip()
        if any(pattern in message.lower() for pattern in _GONE_PATTERNS):
            raise DeviceGone(f"{what}: {message or 'adb exited ' + str(result.returncode)}")
        raise AdbError(f"{what}: {message or 'adb exited ' + str(result.returncode)}")

    def shell(self, command: str, timeout: float = 60) -> ShellResult:
        """Run `command` in the device shell; its exit status comes back through an appended marker."""
        result = self.adb.run("-s", self.serial, "shell", f"{command}; echo {EXIT_MARKER}$?", timeout=timeout)
        self._check(result, f"adb shell {command[:80]!r}")
        output = result.stdout.replace("\r\n", "\n")
        lines = output.rstrip("\n").split("\n")
        match = _EXIT_LINE.search(lines[-1]) if lines else None
        if match is None:
            raise DeviceGone(f"adb shell {command[:80]!r}: the command ended without an exit status "
                             f"(connection lost?); output: {output[-300:]!r}")
        prefix = lines[-1][: match.start()]
        body = "\n".join([*lines[:-1], prefix] if prefix else lines[:-1])
        return ShellResult(int(match.group(1)), body)

    def check_shell(self, command: str, timeout: float = 60) -> str:
        """Output of `command`; raises `AdbError` with its output when it exits non-zero."""
        result = self.shell(command, timeout)
        if result.exit_code != 0:
            raise AdbError(f"`{command[:120]}` exited {result.exit_code}: {result.output.strip()[-500:]}")
        return result.output

    def push(self, local: Path, remote: str, timeout: float = 300) -> None:
        result = self.adb.run("-s", self.serial, "push", str(local), remote, timeout=timeout)
        self._check(result, f"adb push {local.name}")

    def pull(self, remote: str, local: Path, timeout: float = 300) -> None:
        result = self.adb.run("-s", self.serial, "pull", remote, str(local), timeout=timeout)
        self._check(result, f"adb pull {remote}")

    def wait_until_ready(self, timeout: float) -> bool:
        """Whether the device is back in state `device` within `timeout` seconds (after a reconnect)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(e.serial == self.serial and e.state == "device" for e in self.adb.devices()):
                return True
            time.sleep(0.5)
        return False
