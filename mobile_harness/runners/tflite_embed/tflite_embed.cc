// tflite_embed: the device lab's .tflite parity and per-run latency runner.
//
// The device lab's fallback for older LiteRT benchmark_model builds: those from before
// `--output_filepath` write no outputs (so no on-device parity), and those from before percentiles in
// their stats lines print mean/std/min/max only (so no latency distribution). It reads N
// preprocessed faces (raw float32, the model's input shape each), runs them one by one, and writes
// the N float32 embeddings back to back. Flags use benchmark_model's `--name=value` form:
//
//   tflite_embed --graph=m.tflite --inputs=inputs_nhwc.bin --count=256 [--output=out.bin]
//                [--num_threads=1] [--use_xnnpack=true] [--warmup_runs=0] [--num_runs=0]
//
// Output lines read by mobile_harness/latency.py:
//   Init: <ms> ms                  interpreter built, delegate applied, tensors allocated
//   First inference: <ms> ms       face 0, the first invoke
//   Run <i> of <n>: <ms> ms        each timed run on face 0 after the warm-up runs
//   Wrote <n> embeddings of size <e> to <path>

#include <chrono>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "tensorflow/lite/delegates/xnnpack/xnnpack_delegate.h"
#include "tensorflow/lite/interpreter.h"
#include "tensorflow/lite/interpreter_builder.h"
#include "tensorflow/lite/kernels/register.h"
#include "tensorflow/lite/model_builder.h"

namespace {

using Clock = std::chrono::steady_clock;

struct Flags {
  std::string graph;
  std::string inputs;
  std::string output;
  int count = 0;
  int num_threads = 1;
  int warmup_runs = 0;
  int num_runs = 0;
  bool use_xnnpack = true;
};

double MillisecondsSince(Clock::time_point start) {
  return std::chrono::duration<double, std::milli>(Clock::now() - start).count();
}

bool ParseFlags(int argc, char** argv, Flags* flags) {
  for (int i = 1; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::cerr << "tflite_embed: malformed flag " << arg << " (use --name=value)\n";
      return false;
    }
    const std::string name = arg.substr(2, eq - 2);
    const std::string value = arg.substr(eq + 1);
    if (name == "graph") {
      flags->graph = value;
    } else if (name == "inputs") {
      flags->inputs = value;
    } else if (name == "output") {
      flags->output = value;
    } else if (name == "count") {
      flags->count = std::stoi(value);
    } else if (name == "num_threads") {
      flags->num_threads = std::stoi(value);
    } else if (name == "warmup_runs") {
      flags->warmup_runs = std::stoi(value);
    } else if (name == "num_runs") {
      flags->num_runs = std::stoi(value);
    } else if (name == "use_xnnpack") {
      flags->use_xnnpack = value == "true" || value == "1";
    } else {
      std::cerr << "tflite_embed: unknown flag --" << name << "\n";
      return false;
    }
  }
  if (flags->graph.empty() || flags->inputs.empty() || flags->count < 1) {
    std::cerr << "tflite_embed: --graph, --inputs and --count (>= 1) are required\n";
    return false;
  }
  return true;
}

}  // namespace

int main(int argc, char** argv) {
  Flags flags;
  if (!ParseFlags(argc, argv, &flags)) return 2;

  const Clock::time_point init_start = Clock::now();
  std::unique_ptr<tflite::FlatBufferModel> model = tflite::FlatBufferModel::BuildFromFile(flags.graph.c_str());
  if (!model) {
    std::cerr << "tflite_embed: cannot load " << flags.graph << "\n";
    return 1;
  }
  // The delegate must outlive the interpreter, so it is declared first.
  std::unique_ptr<TfLiteDelegate, decltype(&TfLiteXNNPackDelegateDelete)> xnnpack(nullptr,
                                                                                  &TfLiteXNNPackDelegateDelete);
  // Without default delegates, --use_xnnpack=false really measures the built-in CPU kernels.
  tflite::ops::builtin::BuiltinOpResolverWithoutDefaultDelegates resolver;
  std::unique_ptr<tflite::Interpreter> interpreter;
  tflite::InterpreterBuilder builder(*model, resolver);
  builder.SetNumThreads(flags.num_threads);
  if (builder(&interpreter) != kTfLiteOk || !interpreter) {
    std::cerr << "tflite_embed: cannot build an interpreter for " << flags.graph << "\n";
    return 1;
  }
  if (flags.use_xnnpack) {
    TfLiteXNNPackDelegateOptions options = TfLiteXNNPackDelegateOptionsDefault();
    options.num_threads = flags.num_threads;
    xnnpack.reset(TfLiteXNNPackDelegateCreate(&options));
    if (interpreter->ModifyGraphWithDelegate(xnnpack.get()) != kTfLiteOk) {
      std::cerr << "tflite_embed: XNNPACK delegate could not be applied\n";
      return 1;
    }
  }
  if (interpreter->AllocateTensors() != kTfLiteOk) {
    std::cerr << "tflite_embed: AllocateTensors failed\n";
    return 1;
  }
  std::printf("Init: %.3f ms\n", MillisecondsSince(init_start));

  TfLiteTensor* input = interpreter->input_tensor(0);
  const TfLiteTensor* output = interpreter->output_tensor(0);
  if (input->type != kTfLiteFloat32 || output->type != kTfLiteFloat32) {
    std::cerr << "tflite_embed: the model's input and output must be float32\n";
    return 1;
  }
  const size_t face_bytes = input->bytes;
  std::vector<char> faces(face_bytes * flags.count);
  std::ifstream in(flags.inputs, std::ios::binary);
  if (!in.read(faces.data(), static_cast<std::streamsize>(faces.size()))) {
    std::cerr << "tflite_embed: " << flags.inputs << " holds fewer than " << flags.count << " faces of "
              << face_bytes << " bytes\n";
    return 1;
  }

  auto invoke = [&](int face) -> double {
    std::memcpy(input->data.raw, faces.data() + face_bytes * face, face_bytes);
    const Clock::time_point start = Clock::now();
    if (interpreter->Invoke() != kTfLiteOk) {
      std::cerr << "tflite_embed: Invoke failed on face " << face << "\n";
      std::exit(1);
    }
    return MillisecondsSince(start);
  };

  std::printf("First inference: %.3f ms\n", invoke(0));
  for (int i = 0; i < flags.warmup_runs; ++i) invoke(0);
  for (int i = 0; i < flags.num_runs; ++i) {
    std::printf("Run %d of %d: %.3f ms\n", i + 1, flags.num_runs, invoke(0));
  }

  if (!flags.output.empty()) {
    std::ofstream out(flags.output, std::ios::binary);
    for (int face = 0; face < flags.count; ++face) {
      invoke(face);
      out.write(output->data.raw_const, static_cast<std::streamsize>(output->bytes));
    }
    if (!out) {
      std::cerr << "tflite_embed: cannot write " << flags.output << "\n";
      return 1;
    }
    std::printf("Wrote %d embeddings of size %zu to %s\n", flags.count, output->bytes / sizeof(float),
                flags.output.c_str());
  }
  return 0;
}
