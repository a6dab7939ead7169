// ExecuTorch's executor_runner for the simulated arm64 phone: cross-compiled for aarch64 against the
// executorch 1.5.1 manylinux aarch64 wheel's runtime (libexecutorch, the optimized and quantized CPU
// kernels, the XNNPACK backend with its ARM microkernels) and run under qemu-user.
//
// Same command line and log lines as examples/portable/executor_runner/executor_runner.cpp (and
// tests/adb_sim/runtimes.py's host stand-in): `--model_path`, `--inputs` (one raw float32 file),
// `--output_file` (writes `<name>-<i>.bin` per output), `--num_executions`, `--cpu_threads`,
// `--method_name`; ET_LOG lines through the runtime's own posix PAL on stderr: "Model loaded in X ms.",
// "Iteration i of N: X ms", "Model executed successfully N time(s) in X ms.".

#include <executorch/extension/module/module.h>
#include <executorch/extension/tensor/tensor_ptr_maker.h>
#include <executorch/runtime/platform/log.h>
#include <executorch/runtime/platform/runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <map>
#include <string>
#include <vector>

// extension/threadpool/threadpool.h is not in the wheel's headers; the one member used here, as
// libexecutorch_threadpool.so exports it.
namespace executorch::extension::threadpool {
class ThreadPool {
 public:
  bool _unsafe_reset_threadpool(uint32_t num_threads);
};
ThreadPool* get_threadpool();
} // namespace executorch::extension::threadpool

using executorch::extension::from_blob;
using executorch::extension::module::Module;
using executorch::runtime::Error;
using executorch::runtime::EValue;

namespace {

double ms_since(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start).count();
}

// gflags' `--name=value` form; an unknown or malformed flag is an error, as gflags makes it.
bool parse_flags(int argc, char** argv, std::map<std::string, std::string>& flags) {
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    size_t equals = arg.find('=');
    if (arg.rfind("--", 0) != 0 || equals == std::string::npos || !flags.count(arg.substr(2, equals - 2))) {
      std::fprintf(stderr, "ERROR: unknown command line flag '%s'\n", arg.c_str());
      return false;
    }
    flags[arg.substr(2, equals - 2)] = arg.substr(equals + 1);
  }
  return true;
}

} // namespace

int main(int argc, char** argv) {
  std::map<std::string, std::string> flags = {
      {"model_path", "model.pte"}, {"inputs", ""},       {"output_file", ""},
      {"num_executions", "1"},     {"cpu_threads", "-1"}, {"method_name", "forward"}};
  if (!parse_flags(argc, argv, flags)) {
    return 1;
  }
  executorch::runtime::runtime_init();
  int threads = std::atoi(flags["cpu_threads"].c_str());
  if (threads > 0) {
    ET_LOG(Info, "Resetting threadpool with num threads = %d", threads);
    executorch::extension::threadpool::get_threadpool()->_unsafe_reset_threadpool(threads);
  }
  const std::string& path = flags["model_path"];
  auto start = std::chrono::steady_clock::now();
  Module module(path, Module::LoadMode::File);
  if (module.load() != Error::Ok) {
    ET_LOG(Error, "Failed to parse model file %s", path.c_str());
    return 1;
  }
  ET_LOG(Info, "Model file %s is loaded.", path.c_str());
  const std::string& method = flags["method_name"];
  ET_LOG(Info, "Using method %s", method.c_str());
  Error loaded = module.load_method(method);
  if (loaded != Error::Ok) {
    ET_LOG(Error, "Loading of method %s failed with status 0x%" PRIx32, method.c_str(), (uint32_t)loaded);
    return 1;
  }
  ET_LOG(Info, "Model loaded in %f ms.", ms_since(start));
  auto meta = module.method_meta(method);
  auto input_meta = meta->input_tensor_meta(0);
  std::vector<executorch::aten::SizesType> sizes(input_meta->sizes().begin(), input_meta->sizes().end());
  size_t count = 1;
  for (auto size : sizes) {
    count *= size;
  }
  std::vector<float> input(count, 1.0f);
  if (!flags["inputs"].empty()) {
    std::ifstream file(flags["inputs"], std::ios::binary | std::ios::ate);
    if (!file || static_cast<size_t>(file.tellg()) != count * sizeof(float)) {
      ET_LOG(Error, "Input file %s cannot be read or is not %zu bytes", flags["inputs"].c_str(),
             count * sizeof(float));
      return 1;
    }
    file.seekg(0);
    file.read(reinterpret_cast<char*>(input.data()), count * sizeof(float));
  }
  auto tensor = from_blob(input.data(), sizes);
  int executions = std::atoi(flags["num_executions"].c_str());
  double total_ms = 0;
  std::vector<EValue> outputs;
  for (int i = 0; i < executions; ++i) {
    auto begin = std::chrono::steady_clock::now();
    auto result = module.execute(method, std::vector<EValue>{tensor});
    double elapsed = ms_since(begin);
    if (!result.ok()) {
      ET_LOG(Error, "Execution of method %s failed with status 0x%" PRIx32, method.c_str(),
             (uint32_t)result.error());
      return 1;
    }
    outputs = std::move(*result);
    total_ms += elapsed;
    ET_LOG(Info, "Iteration %d of %d: %f ms", i + 1, executions, elapsed);
  }
  ET_LOG(Info, "Model executed successfully %d time(s) in %f ms.", executions, total_ms);
  ET_LOG(Info, "%zu outputs: ", outputs.size());
  for (size_t index = 0; index < outputs.size(); ++index) {
    const auto& out = outputs[index].toTensor();
    const float* data = out.const_data_ptr<float>();
    std::cout << "OutputX " << index << ": tensor(numel=" << out.numel() << ", [" << data[0] << ", " << data[1]
              << ", ...])" << std::endl;
    if (!flags["output_file"].empty()) {
      std::string name = flags["output_file"] + "-" + std::to_string(index) + ".bin";
      ET_LOG(Info, "Writing output to file: %s", name.c_str());
      std::ofstream file(name, std::ios::binary);
      file.write(reinterpret_cast<const char*>(data), out.numel() * sizeof(float));
    }
  }
  return 0;
}
