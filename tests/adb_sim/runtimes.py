"""Host stand-ins for the on-device runners, computing real outputs with the host runtimes.

`benchmark_model` (LiteRT), `executor_runner` (ExecuTorch) and `tflite_embed` (the project's own
runner, mobile_harness/runners/tflite_embed) take the same flags and print the same lines as the
binaries (benchmark_model's `StatWithPercentiles` and `Inference timings in us` lines, executor_runner.cpp's
ET_LOG lines, written to stderr as the posix PAL does). Models run in ai_edge_litert and
executorch.runtime, so outputs and timings are real, only measured on the host.

benchmark_model also fails as the real one does (benchmark_tflite_model.cc): a bad command line is an
`ERROR:` line and exit 1; what the tool checks with TFLITE_LOG(FATAL) (an `--input_layer_value_files`
name missing from `--input_layer`, an input file that cannot be read or has the wrong size) is a
`FATAL:` line and an abort (exit 134, SIGABRT). The simulated phone has no GPU or NNAPI driver: a
delegate asked for there is not created (a `WARN:` line), and the run goes on on the CPU and exits 0,
unless `--require_full_delegation=true` turns that into "Disallowed CPU fallback detected." and exit 1.

The service lives in the test process (a thread on a Unix socket); the kit's `standin.py` processes
forward their flags to it. A lock runs one model at a time, like one phone CPU would.
"""

from __future__ import annotations

import io
import json
import signal
import socket
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import numpy as np

KIT_TOOLS = ("benchmark_model", "executor_runner", "tflite_embed")
STANDIN = Path(__file__).resolve().parent / "kit" / "standin.py"
# Exit status of a tool that called abort(), as the phone's shell reports it.
ABORTED = 128 + signal.SIGABRT


class FlagError(Exception):
    """A command line the real tool would reject."""


def parse_flags(argv: list[str], known: dict[str, str]) -> dict[str, str]:
    """`--name=value` flags (the form both gflags and benchmark_model's parser accept)."""
    flags = dict(known)
    for arg in argv:
        name, sep, value = arg.removeprefix("--").partition("=")
        if not arg.startswith("--") or not sep or name not in known:
            raise FlagError(f"unknown or malformed flag: {arg}")
        flags[name] = value
    return flags


def as_bool(value: str) -> bool:
    return value.lower() in ("1", "true")


def et_log(err: TextIO, message: str, line: int) -> None:
    """An ET_LOG(Info, ...) line as the posix PAL prints it."""
    seconds = time.monotonic()
    print(f"I 00:00:{seconds % 60:09.6f} executorch:executor_runner.cpp:{line}] {message}", file=err)


def stat_line(samples_us: list[int], percentiles: bool = True) -> str:
    """tensorflow::Stat<int64_t>::OutputToStream, followed by StatWithPercentiles' `p5= median= p95=` when
    `percentiles` (builds before those print none). An empty Stat prints `count=0`, and its percentiles
    are int64's quiet_NaN, which is 0."""
    values = np.asarray(samples_us, dtype=np.int64)
    if not len(values):
        line = "count=0"
    elif len(set(samples_us)) == 1:
        line = f"count={len(values)} curr={values[-1]}" + ("(all same)" if len(values) > 1 else "")
    else:
        line = (f"count={len(values)} first={values[0]} curr={values[-1]} min={values.min()} max={values.max()} "
                f"avg={values.mean():g} std={round(values.std())}")
    if not percentiles:
        return line
    ordered = np.sort(values)
    # StatWithPercentiles::percentile: the element at index size * p / 100 of the sorted values.
    p5, median, p95 = (int(ordered[len(ordered) * p // 100]) if len(ordered) else 0 for p in (5, 50, 95))
    return f"{line} p5={p5} median={median} p95={p95}"


def split_name_and_value_file(item: str) -> tuple[str, str] | None:
    """SplitInputLayerNameAndValueFile: one `--input_layer_value_files` item split at its single ':', a '::'
    standing for a ':' in the name or the path ("input::0:/tmp/x" is ("input:0", "/tmp/x")); None unless
    there is exactly one single ':'."""
    parts, current, index = [], "", 0
    while index < len(item):
        if item.startswith("::", index):
            current, index = current + ":", index + 2
        elif item[index] == ":":
            parts, current, index = [*parts, current], "", index + 1
        else:
            current, index = current + item[index], index + 1
    parts.append(current)
    return (parts[0], parts[1]) if len(parts) == 2 else None


class TFLiteModel:
    def __init__(self, path: Path, threads: int, xnnpack: bool = True) -> None:
        from ai_edge_litert.interpreter import Interpreter, OpResolverType

        resolver = OpResolverType.AUTO if xnnpack else OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES
        self.interpreter = Interpreter(model_path=str(path), num_threads=threads,
                                       experimental_op_resolver_type=resolver)
        nodes = self.interpreter._interpreter.NumNodes()
        self.interpreter.allocate_tensors()
        # The XNNPACK delegate adds one node per partition it takes. It runs the whole graph when it took
        # one partition reading the graph's inputs and writing its outputs.
        self.delegate_kernels = self.interpreter._interpreter.NumNodes() - nodes
        self.fully_delegated = self.delegate_kernels == 1 and (
            set(self.interpreter._interpreter.InputIndices()) <= set(self.interpreter._interpreter.NodeInputs(nodes))
            and set(self.interpreter._interpreter.OutputIndices())
            <= set(self.interpreter._interpreter.NodeOutputs(nodes)))
        self.input = self.interpreter.get_input_details()[0]
        self.output = self.interpreter.get_output_details()[0]

    def __call__(self, x: np.ndarray) -> np.ndarray:
        self.interpreter.set_tensor(self.input["index"], x.reshape(self.input["shape"]))
        self.interpreter.invoke()
        return self.interpreter.get_tensor(self.output["index"]).copy()


def timed(call: Callable[[], object]) -> int:
    start = time.perf_counter_ns()
    call()
    return (time.perf_counter_ns() - start) // 1000


def delegation_line(name: str, model: TFLiteModel) -> str:
    """What benchmark_tflite_model.cc logs once a delegate provider's delegate is applied."""
    if model.fully_delegated:
        return (f"INFO: Explicitly applied {name} delegate, and the model graph will be completely executed by the "
                "delegate.")
    if model.delegate_kernels:
        return (f"INFO: Explicitly applied {name} delegate, and the model graph will be partially executed by the "
                f"delegate w/ {model.delegate_kernels} delegate kernels.")
    return f"INFO: Though {name} delegate is explicitly applied, the model graph will not be executed by the delegate."


def benchmark_model(argv: list[str], cwd: Path, out: TextIO, err: TextIO, legacy: bool = False) -> int:
    """LiteRT's benchmark_model, in the order benchmark_tflite_model.cc checks things (see module docstring).
    `legacy` plays a build from before `--output_filepath` (and before percentiles in its stats lines): it
    leaves flags it does not know unconsumed, as the real tool's parser does, and writes no outputs."""
    known = {"graph": "", "num_threads": "-1", "warmup_runs": "1", "num_runs": "50", "min_secs": "1",
             "warmup_min_secs": "0.5", "max_secs": "150", "use_xnnpack": "true", "use_gpu": "false",
             "use_nnapi": "false", "require_full_delegation": "false", "input_layer": "", "input_layer_shape": "",
             "input_layer_value_files": "", "output_filepath": ""}
    unconsumed = []
    if legacy:
        unconsumed = [a for a in argv if a.startswith("--output_filepath=")]
        argv = [a for a in argv if a not in unconsumed]
    flags = parse_flags(argv, known)
    print("INFO: STARTING!", file=out)
    if unconsumed:
        print(f"WARN: Unconsumed cmdline flags: {' '.join(unconsumed)}", file=out)
    # ValidateParams -> PopulateInputLayerInfo, before the model is loaded.
    names = flags["input_layer"].split(",") if flags["input_layer"] else []
    shapes = flags["input_layer_shape"].split(":") if flags["input_layer_shape"] else []
    if len(names) != len(shapes):
        print(f"ERROR: The number of items in --input_layer_shape ({flags['input_layer_shape']}, with {len(shapes)} "
              f"items) must match the number of items in --input_layer ({flags['input_layer']}, with {len(names)} "
              "items).\nERROR: Benchmarking failed.", file=err)
        return 1
    value_files: dict[str, str] = {}
    for item in flags["input_layer_value_files"].split(",") if flags["input_layer_value_files"] else []:
        pair = split_name_and_value_file(item)
        if pair is None:
            print(f"ERROR: Wrong input value file item specified: {item}\nERROR: Benchmarking failed.", file=err)
            return 1
        if pair[0] not in names:
            # FindLayerInfoIndex: TFLITE_LOG(FATAL), which aborts.
            print(f"FATAL: Cannot find the corresponding input_layer name({pair[0]}) in --input_layer as "
                  f"{flags['input_layer']}", file=err)
            return ABORTED
        value_files[pair[0]] = pair[1]
    print(f"INFO: Min num runs: [{flags['num_runs']}]\nINFO: Num threads: [{flags['num_threads']}]\n"
          f"INFO: Min warmup runs: [{flags['warmup_runs']}]\nINFO: Graph: [{flags['graph']}]", file=out)
    graph = cwd / flags["graph"]
    if not graph.is_file():
        print(f"ERROR: Could not open '{flags['graph']}'.\nERROR: Benchmarking failed.", file=err)
        return 1
    threads = int(flags["num_threads"])
    start = time.perf_counter_ns()
    model = TFLiteModel(graph, threads if threads > 0 else 1, xnnpack=as_bool(flags["use_xnnpack"]))
    print(f"INFO: Loaded model {flags['graph']}\nINFO: The input model file size (MB): {graph.stat().st_size / 1e6:g}",
          file=out)
    # Init: each provider asked for creates its delegate; one that cannot is skipped with a warning.
    applied = []
    if as_bool(flags["use_gpu"]):
        print("WARN: GPU acceleration is unsupported on this platform.", file=out)
    if as_bool(flags["use_nnapi"]):
        print("WARN: NNAPI acceleration is unsupported on this platform.", file=out)
    if as_bool(flags["use_xnnpack"]):
        print("INFO: Created TensorFlow Lite XNNPACK delegate for CPU.", file=out)
        applied.append(("XNNPACK", model))
    require_full = as_bool(flags["require_full_delegation"])
    if require_full and (not applied or not all(m.fully_delegated for _, m in applied)):
        print("ERROR: Disallowed CPU fallback detected.\nERROR: Benchmarking failed.", file=err)
        return 1
    for name, delegated in applied:
        print(delegation_line(name, delegated), file=out)
    tensor, shape = model.input, [int(d) for d in model.input["shape"]]
    if names:
        if names[0] != tensor["name"]:
            print(f"WARN: Tensor # {tensor['index']} is named {tensor['name']} but flags call it {names[0]}", file=out)
        if len(shapes[0].split(",")) != len(shape):
            print(f"ERROR: Input tensor #{tensor['index']} should have {len(shape)} dimensions!\n"
                  "ERROR: Benchmarking failed.", file=err)
            return 1
    init_us = (time.perf_counter_ns() - start) // 1000
    print(f"INFO: Initialized session in {init_us / 1e3:g}ms.", file=out)
    x = np.random.default_rng(0).uniform(0, 255, shape).astype(np.float32)
    path = value_files.get(names[0]) if names else None
    if path is not None:
        # LoadInputTensorData: TFLITE_LOG(FATAL) for a file it cannot read or of another size than the tensor.
        if not (cwd / path).is_file():
            print(f"FATAL: Failed to read the input_layer_value_file:{path}", file=err)
            return ABORTED
        data = (cwd / path).read_bytes()
        if len(data) != x.nbytes:
            print(f"FATAL: The size of {path} is {len(data)} bytes. It should be {x.nbytes} bytes.", file=err)
            return ABORTED
        x = np.frombuffer(data, dtype=np.float32).reshape(x.shape)
    stats = []
    for runs, secs in ((int(flags["warmup_runs"]), flags["warmup_min_secs"]), (int(flags["num_runs"]),
                                                                                 flags["min_secs"])):
        print(f"INFO: Running benchmark for at least {runs} iterations and at least {float(secs):g} seconds but "
              f"terminate if exceeding {float(flags['max_secs']):g} seconds.", file=out)
        # BenchmarkModel::Run: at least `runs` runs and at least `secs` seconds, stopping past max_secs.
        samples: list[int] = []
        begin = time.monotonic()
        while (len(samples) < runs or time.monotonic() - begin < float(secs)) and (
                time.monotonic() - begin <= float(flags["max_secs"])):
            samples.append(timed(lambda: model(x)))
        print(f"INFO: {stat_line(samples, percentiles=not legacy)}\n", file=out)
        stats.append(samples)
    warmup, regular = stats
    # An empty Stat's first() is 0 and its avg() int64's quiet_NaN, also 0.
    print(f"INFO: Inference timings in us: Init: {init_us}, First inference: {warmup[0] if warmup else 0}, "
          f"Warmup (avg): {np.mean(warmup) if warmup else 0:g}, Inference (avg): "
          f"{np.mean(regular) if regular else 0:g}", file=out)
    if flags["output_filepath"]:
        # OutputSaver: the output tensors' raw bytes, one after another, at the end of the benchmark.
        model(x).astype(np.float32).tofile(cwd / flags["output_filepath"])
    return 0


def tflite_embed(argv: list[str], cwd: Path, out: TextIO, err: TextIO) -> int:
    flags = parse_flags(argv, {"graph": "", "inputs": "", "count": "0", "output": "", "num_threads": "1",
                               "use_xnnpack": "true", "warmup_runs": "0", "num_runs": "0"})
    graph = cwd / flags["graph"]
    start = time.perf_counter_ns()
    try:
        model = TFLiteModel(graph, int(flags["num_threads"]))
    except ValueError as error:
        print(f"tflite_embed: cannot load {flags['graph']}: {error}", file=err)
        return 1
    print(f"Init: {(time.perf_counter_ns() - start) / 1e6:.3f} ms", file=out)
    count = int(flags["count"])
    face = model.input["shape"][1:]
    inputs = np.fromfile(cwd / flags["inputs"], dtype=np.float32, count=count * int(np.prod(face)))
    inputs = inputs.reshape(count, *face)
    print(f"First inference: {timed(lambda: model(inputs[:1])) / 1e3:.3f} ms", file=out)
    for _ in range(int(flags["warmup_runs"])):
        model(inputs[:1])
    runs = int(flags["num_runs"])
    for index in range(runs):
        print(f"Run {index + 1} of {runs}: {timed(lambda: model(inputs[:1])) / 1e3:.3f} ms", file=out)
    if flags["output"]:
        outputs = np.concatenate([model(inputs[i : i + 1]) for i in range(count)])
        outputs.astype(np.float32).tofile(cwd / flags["output"])
        print(f"Wrote {count} embeddings of size {outputs.shape[1]} to {flags['output']}", file=out)
    return 0


def executor_runner(argv: list[str], cwd: Path, out: TextIO, err: TextIO, legacy: bool = False) -> int:
    """ExecuTorch's executor_runner. `legacy` plays an older build that logs neither the load time nor
    per-iteration lines, only `Model executed successfully N time(s) in X ms.`"""
    import torch
    from executorch.extension.pybindings import portable_lib
    from executorch.runtime import Runtime

    flags = parse_flags(argv, {"model_path": "model.pte", "inputs": "", "output_file": "", "num_executions": "1",
                               "cpu_threads": "-1", "method_name": ""})
    threads = int(flags["cpu_threads"])
    et_log(err, f"Resetting threadpool with num threads = {threads if threads > 0 else 1}", 214)
    portable_lib._unsafe_reset_threadpool(threads if threads > 0 else 1)
    path = cwd / flags["model_path"]
    start = time.perf_counter_ns()
    try:
        program = Runtime.get().load_program(path)
    except (RuntimeError, ValueError):
        et_log(err, f"Failed to parse model file {flags['model_path']}", 380)
        return 1
    et_log(err, f"Model file {flags['model_path']} is loaded.", 383)
    et_log(err, "Using method forward", 396)
    method = program.load_method(flags["method_name"] or "forward")
    if not legacy:
        et_log(err, f"Model loaded in {(time.perf_counter_ns() - start) / 1e6:f} ms.", 520)
    shape = list(method.metadata.input_tensor_meta(0).sizes())
    if flags["inputs"]:
        x = np.fromfile(cwd / flags["inputs"], dtype=np.float32).reshape(shape)
    else:
        x = np.ones(shape, dtype=np.float32)
    executions = int(flags["num_executions"])
    total_ms = 0.0
    output = None
    for index in range(executions):
        start = time.perf_counter_ns()
        output = method.execute([torch.from_numpy(x)])[0].numpy()
        elapsed_ms = (time.perf_counter_ns() - start) / 1e6
        total_ms += elapsed_ms
        if not legacy:
            et_log(err, f"Iteration {index + 1} of {executions}: {elapsed_ms:f} ms", 640)
    et_log(err, f"Model executed successfully {executions} time(s) in {total_ms:f} ms.", 660)
    et_log(err, "1 outputs: ", 666)
    if flags["output_file"] and output is not None:
        name = f"{flags['output_file']}-0.bin"
        et_log(err, f"Writing output to file: {name}", 679)
        output.astype(np.float32).tofile(cwd / name)
    if output is not None:
        print(f"OutputX 0: tensor(sizes={list(output.shape)}, {np.array2string(output.ravel()[:4])} ...)", file=out)
    return 0


TOOLS: dict[str, Callable[..., int]] = {
    "benchmark_model": benchmark_model, "executor_runner": executor_runner, "tflite_embed": tflite_embed,
}


class RuntimeService:
    """Serves the kit stand-ins on a Unix socket at `path` until `stop()`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self.server = socket.socket(socket.AF_UNIX)
        self.server.bind(str(path))
        self.server.listen()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                connection, _ = self.server.accept()
            except OSError:
                return
            threading.Thread(target=self._answer, args=(connection,), daemon=True).start()

    def _answer(self, connection: socket.socket) -> None:
        with connection:
            request = json.loads(connection.makefile().readline())
            stdout, stderr = io.StringIO(), io.StringIO()
            with self.lock:
                try:
                    tool, _, variant = request["tool"].partition("@")
                    extra = {"legacy": True} if variant == "legacy" else {}
                    code = TOOLS[tool](request["argv"], Path(request["cwd"]), stdout, stderr, **extra)
                except FlagError as error:
                    print(f"ERROR: {error}", file=stderr)
                    code = 1
                except Exception:  # a stand-in bug must reach the test as output, not as a hang
                    stderr.write(traceback.format_exc())
                    code = 70
            reply = {"stdout": stdout.getvalue(), "stderr": stderr.getvalue(), "code": code}
            connection.sendall(json.dumps(reply).encode() + b"\n")

    def stop(self) -> None:
        self.server.close()
        self.path.unlink(missing_ok=True)


def make_test_kit(kit: Path, abi: str, tools: tuple[str, ...] = KIT_TOOLS, legacy: tuple[str, ...] = ()) -> Path:
    """A runner kit for `abi` whose binaries are stand-in scripts (see module docstring): `tools` only, those
    in `legacy` playing older releases of the official tools (see `benchmark_model`, `executor_runner`)."""
    folder = kit / abi
    folder.mkdir(parents=True, exist_ok=True)
    for tool in tools:
        script = folder / tool
        played = f"{tool}@legacy" if tool in legacy else tool
        script.write_text(f'#!/bin/sh\nexec "$SIM_PYTHON" -S {STANDIN} {played} "$@"\n')
        script.chmod(0o755)
    return kit
