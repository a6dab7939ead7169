"""A runner-kit binary of the simulated phone: `standin.py TOOL FLAGS...` plays `TOOL`.

Started by the simulated phone's shell as the real binary would be. It honours the phone's injected
faults itself (a hung runner really hangs, a crashing one really dies of SIGSEGV) and otherwise hands
its flags to the test's `RuntimeService`, which has the runtimes loaded; starting ExecuTorch in
every process would take seconds per call. Standard library only, so it starts fast.
"""

import json
import os
import signal
import socket
import sys
import time
from pathlib import Path


def main() -> int:
    played, argv = sys.argv[1], sys.argv[2:]
    tool = played.partition("@")[0]  # "executor_runner@legacy" plays an older release
    root = Path(os.environ["SIM_ROOT"])
    faults = json.loads((root / "sim_state.json").read_text())["faults"]
    if tool in faults["hang"]:
        print(f"{tool}: started", flush=True)
        while True:
            time.sleep(1)
    if tool in faults["crash"]:
        print(f"{tool}: loading model", file=sys.stderr, flush=True)
        with (root / "logcat.txt").open("a") as log:
            log.write(f"F libc    : Fatal signal 11 (SIGSEGV), code 1 (SEGV_MAPERR) in tid {os.getpid()} ({tool})\n"
                      f"F DEBUG   : *** *** *** *** *** *** *** *** *** *** *** *** *** *** *** ***\n"
                      f"F DEBUG   : pid: {os.getpid()}, name: {tool}  >>> {tool} <<<\n")
        os.kill(os.getpid(), signal.SIGSEGV)
    with socket.socket(socket.AF_UNIX) as connection:
        connection.connect(os.environ["SIM_RUNTIME_SOCKET"])
        connection.sendall(json.dumps({"tool": played, "argv": argv, "cwd": os.getcwd()}).encode() + b"\n")
        reply = json.loads(connection.makefile().readline())
    sys.stdout.write(reply["stdout"])
    sys.stderr.write(reply["stderr"])
    with (root / "thermal_runs.log").open("a") as log:  # the phone heats with every execution (sim.HEAT_LOG)
        log.write(f"{executions(argv)}\n")
    return reply["code"]


def executions(argv: list[str]) -> int:
    """How many times this invocation ran the model: executor_runner's --num_executions, benchmark_model's and
    tflite_embed's warm-up plus timed runs, else tflite_embed's --count faces, else once."""
    flags = dict(arg[2:].split("=", 1) for arg in argv if arg.startswith("--") and "=" in arg)
    if "num_executions" in flags:
        return int(flags["num_executions"])
    runs = int(flags.get("warmup_runs", 0)) + int(flags.get("num_runs", 0))
    return runs or int(flags.get("count", 1))


if __name__ == "__main__":
    sys.exit(main())
