#include "vaekit/runtime.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/serialize.h>

#ifdef VAEKIT_WITH_AOTI
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#endif

#include <cstdint>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iterator>
#include <limits>
#include <new>
#include <sstream>

#if defined(__unix__) || defined(__APPLE__)
#include <unistd.h>
#endif

namespace vaekit {
namespace {

constexpr const char* kFormat = "vaekit-torchscript/1";
constexpr const char* kAotiFormat = "vaekit-aoti/1";

bool ends_with(const std::string& text, const std::string& suffix) {
  return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::vector<int64_t> parse_shape(const std::string& text) {
  std::vector<int64_t> shape;
  std::stringstream in(text);
  for (std::string item; std::getline(in, item, ',');) shape.push_back(std::stoll(item));
  return shape;
}

std::string shape_string(c10::IntArrayRef sizes) {
  std::ostringstream out;
  out << "[";
  for (size_t i = 0; i < sizes.size(); ++i) out << (i ? ", " : "") << sizes[i];
  out << "]";
  return out.str();
}

// One readable line from an exception: a c10::Error without its C++ backtrace; an error raised inside
// the TorchScript interpreter without the TorchScript traceback (the error itself is its last line);
// without libtorch's "[enforce fail at FILE:LINE] CONDITION. " prefix, nor the advice that follows a
// zip reader error (it blames a corrupted checkpoint for any file that is not the expected archive).
std::string one_line(const std::exception& e) {
  auto* c10_error = dynamic_cast<const c10::Error*>(&e);
  std::string text = c10_error ? c10_error->what_without_backtrace() : e.what();
  std::vector<std::string> lines;
  std::stringstream in(text);
  for (std::string line; std::getline(in, line);) {
    if (line.find_first_not_of(" \t\r") != std::string::npos) lines.push_back(line);
  }
  if (lines.empty()) return "unknown error";
  bool interpreter = text.find("failed in the TorchScript interpreter") != std::string::npos;
  std::string line = interpreter ? lines.back() : lines.front();
  auto enforce = line.find("[enforce fail at ");
  if (enforce != std::string::npos) {
    auto end = line.find(". ", line.find("] ", enforce));
    if (end != std::string::npos) line = line.substr(0, enforce) + line.substr(end + 2);
  }
  return line.substr(0, line.find(" This is an internal miniz error."));
}

// f(), with anything it throws turned into an Error "CONTEXT: what went wrong" (an Error passes as is).
template <typename F>
auto guarded(const std::string& context, F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const Error&) {
    throw;
  } catch (const std::bad_alloc&) {
    throw Error(context + ": out of memory");
  } catch (const std::exception& e) {
    throw Error(context + ": " + one_line(e));
  } catch (...) {
    throw Error(context + ": unknown error");
  }
}

// A safetensors file starts with the length of its JSON header (8 bytes, little-endian), then '{'.
bool is_safetensors(const unsigned char (&head)[9], std::uintmax_t size) {
  std::uint64_t header_size = 0;
  for (int i = 7; i >= 0; --i) header_size = header_size << 8 | head[i];
  return size >= sizeof head && head[8] == '{' && header_size >= 2 && header_size <= size - 8;
}

// TorchScript archives and AOTInductor packages are zip files.
bool is_zip(const unsigned char (&head)[9]) { return head[0] == 'P' && head[1] == 'K' && head[2] == 3 && head[3] == 4; }

// Bytes of physical memory, 0 where unknown.
double physical_memory() {
#if defined(_SC_PHYS_PAGES) && defined(_SC_PAGESIZE)
  long pages = sysconf(_SC_PHYS_PAGES), page_size = sysconf(_SC_PAGESIZE);
  if (pages > 0 && page_size > 0) return static_cast<double>(pages) * static_cast<double>(page_size);
#endif
  return 0;
}

std::string gib(double bytes) {
  char text[64];
  std::snprintf(text, sizeof text, "%.1f GiB", bytes / (1024.0 * 1024.0 * 1024.0));
  return text;
}

}  // namespace

Model Model::load(const std::string& path, const LoadOptions& options) {
  return guarded("cannot load '" + path + "'", [&] {
    namespace fs = std::filesystem;
    std::error_code ec;
    if (fs::is_directory(path, ec)) {
      if (fs::exists(fs::path(path) / "model.safetensors", ec)) {
        throw Error("'" + path + "' is a vaekit run directory, not an exported model: run `vaekit export " + path +
                    "` first and load the model.pt it writes");
      }
      throw Error("'" + path + "' is a directory, not an exported model");
    }
    std::ifstream probe(path, std::ios::binary);
    if (!probe) throw Error("cannot open model file '" + path + "'");
    unsigned char head[9] = {};
    probe.read(reinterpret_cast<char*>(head), sizeof head);
    if (is_safetensors(head, fs::file_size(path, ec))) {
      throw Error("'" + path + "' is a vaekit checkpoint (safetensors, like a run's model.safetensors), not an "
                  "exported model: run `vaekit export RUN_DIR` first and load the model.pt it writes");
    }
    if (!is_zip(head)) {
      throw Error("'" + path + "' is not a TorchScript archive (nor an AOTInductor package): not even a zip file");
    }
    if (!ends_with(path, ".pt2")) return load_torchscript(path);
    if (!options.trust_native_code) {
      throw Error("refusing to load '" + path + "': an AOTInductor package (.pt2) runs the native code inside it when "
                  "it is loaded; only if you trust where it came from, pass --trust-native-code (vaekit-runner) or "
                  "LoadOptions::trust_native_code (C++), or use the TorchScript archive (.pt), which needs no trust");
    }
    return load_aoti(path);
  });
}

Model Model::load_torchscript(const std::string& path) {
  Model model;
  torch::jit::ExtraFilesMap extra{{"config.json", ""}};
  model.module_ = guarded("'" + path + "' is not a TorchScript archive",
                          [&] { return torch::jit::load(path, torch::kCPU, extra); });
  if (!model.module_.hasattr("vaekit_format") || !model.module_.attr("vaekit_format").isString() ||
      model.module_.attr("vaekit_format").toStringRef() != kFormat) {
    throw Error("'" + path + "' is a TorchScript archive but not a vaekit model");
  }
  model.module_.eval();
  model.config_json_ = extra["config.json"];
  model.input_shape_ = model.module_.attr("input_shape").toIntVector();
  model.latent_dim_ = model.module_.attr("latent_dim").toInt();
  model.deterministic_ = model.module_.attr("deterministic").toBool();
  model.can_sample_ = model.module_.attr("can_sample").toBool();
  if (model.module_.hasattr("sample_error")) model.sample_error_ = model.module_.attr("sample_error").toStringRef();
  if (model.module_.hasattr("num_classes")) model.num_classes_ = model.module_.attr("num_classes").toInt();
  return model;
}

#ifdef VAEKIT_WITH_AOTI
using Loader = torch::inductor::AOTIModelPackageLoader;

Model Model::load_aoti(const std::string& path) {
  Model model;
  model.format_ = "aoti";
  guarded("'" + path + "' is not a loadable AOTInductor package", [&] {
    auto encode = std::make_shared<Loader>(path, "encode");
    auto decode = std::make_shared<Loader>(path, "decode");
    auto meta = encode->get_metadata();
    if (meta["vaekit_format"] != kAotiFormat) {
      throw Error("'" + path + "' is an AOTInductor package but not a vaekit model");
    }
    model.input_shape_ = parse_shape(meta["input_shape"]);
    model.latent_dim_ = std::stoll(meta["latent_dim"]);
    model.deterministic_ = meta["deterministic"] == "1";
    model.can_sample_ = meta["can_sample"] == "1";
    if (meta.count("sample_error")) model.sample_error_ = meta["sample_error"];
    model.config_json_ = meta["config_json"];
    model.aoti_encode_ = encode;
    model.aoti_decode_ = decode;
  });
  return model;
}

torch::Tensor Model::run_aoti(const std::shared_ptr<void>& loader, const torch::Tensor& input) {
  std::vector<at::Tensor> inputs{input.to(torch::kFloat).contiguous()};
  return static_cast<Loader*>(loader.get())->run(inputs).at(0);
}
#else
Model Model::load_aoti(const std::string& path) {
  throw Error("'" + path + "' is an AOTInductor package; rebuild the runtime with -DVAEKIT_WITH_AOTI=ON");
}

torch::Tensor Model::run_aoti(const std::shared_ptr<void>&, const torch::Tensor&) {
  throw Error("this runtime was built without AOTInductor support");
}
#endif

void Model::check_input(const torch::Tensor& x) const {
  bool ok = x.dim() == static_cast<int64_t>(input_shape_.size()) + 1;
  for (size_t i = 0; ok && i < input_shape_.size(); ++i) ok = x.size(i + 1) == input_shape_[i];
  if (!ok) {
    throw Error("wrong input shape: expected [N, " + shape_string(input_shape_).substr(1) + ", got " +
                shape_string(x.sizes()));
  }
}

void Model::check_latent(const torch::Tensor& z) const {
  if (z.dim() != 2 || z.size(1) != latent_dim_) {
    throw Error("wrong latent shape: expected [N, " + std::to_string(latent_dim_) + "], got " + shape_string(z.sizes()));
  }
}

void Model::require_conditional(bool wanted, const std::string& method) const {
  if (wanted && !conditional()) {
    throw Error(method + " failed: this model is not conditional (trained without --condition label): call it "
                "without labels");
  }
  if (!wanted && conditional()) {
    throw Error(method + " failed: this model is conditional (--condition label, " + std::to_string(num_classes_) +
                " classes): pass the labels, e.g. " + method + "(x, c) with c [B] int64 (sample(n, seed, label))");
  }
}

torch::Tensor Model::check_labels(const torch::Tensor& c, int64_t batch) const {
  if (c.dim() != 1 || c.size(0) != batch || c.is_floating_point() || c.is_complex() || c.scalar_type() == torch::kBool) {
    throw Error("wrong labels: expected " + std::to_string(batch) + " integer labels [" + std::to_string(batch) +
                "], got " + std::string(c.dtype().name()) + " " + shape_string(c.sizes()));
  }
  torch::Tensor labels = c.to(torch::kLong);
  if (batch > 0) {
    int64_t low = labels.min().item<int64_t>(), high = labels.max().item<int64_t>();
    if (low < 0 || high >= num_classes_) {
      throw Error("label " + std::to_string(low < 0 ? low : high) + " is out of range: this model knows the labels 0.." +
                  std::to_string(num_classes_ - 1));
    }
  }
  return labels;
}

std::pair<torch::Tensor, torch::Tensor> Model::encode(const torch::Tensor& x, const torch::Tensor& c) {
  require_conditional(true, "encode");
  return guarded("encode failed", [&]() -> std::pair<torch::Tensor, torch::Tensor> {
    check_input(x);
    torch::Tensor labels = check_labels(c, x.size(0));
    torch::NoGradGuard no_grad;
    auto out = module_.get_method("encode")({x.to(torch::kFloat), labels}).toTuple();
    return {out->elements()[0].toTensor(), out->elements()[1].toTensor()};
  });
}

torch::Tensor Model::decode(const torch::Tensor& z, const torch::Tensor& c) {
  require_conditional(true, "decode");
  return guarded("decode failed", [&] {
    check_latent(z);
    torch::Tensor labels = check_labels(c, z.size(0));
    torch::NoGradGuard no_grad;
    return module_.get_method("decode")({z.to(torch::kFloat), labels}).toTensor();
  });
}

torch::Tensor Model::reconstruct(const torch::Tensor& x, const torch::Tensor& c) {
  require_conditional(true, "reconstruct");
  return guarded("reconstruct failed", [&] {
    check_input(x);
    torch::Tensor labels = check_labels(c, x.size(0));
    torch::NoGradGuard no_grad;
    return module_.get_method("reconstruct")({x.to(torch::kFloat), labels}).toTensor();
  });
}

torch::Tensor Model::sample(int64_t n, int64_t seed, int64_t label) {
  require_conditional(true, "sample");
  check_sample(n);
  if (label < 0 || label >= num_classes_) {
    throw Error("label " + std::to_string(label) + " is out of range: this model knows the labels 0.." +
                std::to_string(num_classes_ - 1));
  }
  return guarded("sample failed", [&] {
    torch::NoGradGuard no_grad;
    return module_.get_method("sample")({n, seed, label}).toTensor();
  });
}

std::pair<torch::Tensor, torch::Tensor> Model::encode(const torch::Tensor& x) {
  require_conditional(false, "encode");
  return guarded("encode failed", [&]() -> std::pair<torch::Tensor, torch::Tensor> {
    check_input(x);
    torch::NoGradGuard no_grad;
    if (format_ == "aoti") {
      torch::Tensor params = run_aoti(aoti_encode_, x);
      if (deterministic_) return {params, params.new_empty({params.size(0), 0})};
      auto halves = params.chunk(2, -1);
      return {halves[0], halves[1]};
    }
    auto out = module_.get_method("encode")({x.to(torch::kFloat)}).toTuple();
    return {out->elements()[0].toTensor(), out->elements()[1].toTensor()};
  });
}

torch::Tensor Model::decode(const torch::Tensor& z) {
  require_conditional(false, "decode");
  return guarded("decode failed", [&] {
    check_latent(z);
    torch::NoGradGuard no_grad;
    if (format_ == "aoti") return run_aoti(aoti_decode_, z);
    return module_.get_method("decode")({z.to(torch::kFloat)}).toTensor();
  });
}

torch::Tensor Model::reconstruct(const torch::Tensor& x) {
  require_conditional(false, "reconstruct");
  return guarded("reconstruct failed", [&] {
    check_input(x);
    torch::NoGradGuard no_grad;
    if (format_ == "aoti") return decode(encode(x).first);
    return module_.get_method("reconstruct")({x.to(torch::kFloat)}).toTensor();
  });
}

torch::Tensor Model::sample(int64_t n, int64_t seed) {
  require_conditional(false, "sample");
  check_sample(n);
  return guarded("sample failed", [&] {
    torch::NoGradGuard no_grad;
    if (format_ == "aoti") {  // the same draw as the TorchScript archive's torch.Generator().manual_seed(seed)
      auto generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
      return decode(torch::randn({n, latent_dim_}, generator));
    }
    return module_.get_method("sample")({n, seed}).toTensor();
  });
}

void Model::check_sample(int64_t n) const {
  if (n < 1) throw Error("the number of samples must be at least 1, got " + std::to_string(n));
  if (!can_sample_) throw Error(sample_error_);
  // The output alone takes n * prod(input_shape) floats: refuse what cannot fit rather than attempt it.
  double bytes = static_cast<double>(n) * sizeof(float);
  for (int64_t size : input_shape_) bytes *= static_cast<double>(size);
  double memory = physical_memory();
  if (bytes > static_cast<double>(std::numeric_limits<int64_t>::max()) || (memory > 0 && bytes > memory)) {
    throw Error(std::to_string(n) + " samples of shape " + shape_string(input_shape_) + " take " + gib(bytes) +
                ", more than this machine's memory" + (memory > 0 ? " (" + gib(memory) + ")" : "") +
                ": ask for fewer");
  }
}

torch::Tensor load_tensor(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open tensor file '" + path + "'");
  return guarded("'" + path + "' is not a tensor file written by torch.save", [&] {
    std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
    torch::IValue value = torch::pickle_load(bytes);
    if (!value.isTensor()) throw Error("'" + path + "' holds no tensor (save one with torch.save(tensor, path))");
    return value.toTensor();
  });
}

void save_tensor(const torch::Tensor& tensor, const std::string& path) {
  guarded("cannot write '" + path + "'", [&] {
    std::vector<char> bytes = torch::pickle_save(tensor.contiguous());
    std::ofstream out(path, std::ios::binary);
    if (!out) throw Error("cannot write '" + path + "'");
    out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
    if (!out) throw Error("cannot write '" + path + "'");
  });
}

}  // namespace vaekit
