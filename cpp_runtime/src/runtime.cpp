#include "vaekit/runtime.h"

#include <ATen/CPUGeneratorImpl.h>
#include <torch/serialize.h>

#ifdef VAEKIT_WITH_AOTI
#include <torch/csrc/inductor/aoti_package/model_package_loader.h>
#endif

#include <fstream>
#include <iterator>
#include <sstream>

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

std::string first_line(const std::string& text) { return text.substr(0, text.find('\n')); }

}  // namespace

Model Model::load(const std::string& path) {
  std::ifstream probe(path, std::ios::binary);
  if (!probe) throw Error("cannot open model file '" + path + "'");
  if (ends_with(path, ".pt2")) return load_aoti(path);
  Model model;
  torch::jit::ExtraFilesMap extra{{"config.json", ""}};
  try {
    model.module_ = torch::jit::load(path, torch::kCPU, extra);
  } catch (const c10::Error& e) {
    throw Error("'" + path + "' is not a TorchScript archive (" + first_line(e.what_without_backtrace()) + ")");
  }
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
  return model;
}

#ifdef VAEKIT_WITH_AOTI
using Loader = torch::inductor::AOTIModelPackageLoader;

Model Model::load_aoti(const std::string& path) {
  Model model;
  model.format_ = "aoti";
  try {
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
    model.config_json_ = meta["config_json"];
    model.aoti_encode_ = encode;
    model.aoti_decode_ = decode;
  } catch (const c10::Error& e) {
    throw Error("'" + path + "' is not a loadable AOTInductor package (" + first_line(e.what_without_backtrace()) + ")");
  } catch (const std::exception& e) {
    if (dynamic_cast<const Error*>(&e)) throw;
    throw Error("'" + path + "' is not a loadable AOTInductor package (" + first_line(e.what()) + ")");
  }
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

std::pair<torch::Tensor, torch::Tensor> Model::encode(const torch::Tensor& x) {
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
}

torch::Tensor Model::decode(const torch::Tensor& z) {
  check_latent(z);
  torch::NoGradGuard no_grad;
  if (format_ == "aoti") return run_aoti(aoti_decode_, z);
  return module_.get_method("decode")({z.to(torch::kFloat)}).toTensor();
}

torch::Tensor Model::reconstruct(const torch::Tensor& x) {
  check_input(x);
  torch::NoGradGuard no_grad;
  if (format_ == "aoti") return decode(encode(x).first);
  return module_.get_method("reconstruct")({x.to(torch::kFloat)}).toTensor();
}

torch::Tensor Model::sample(int64_t n, int64_t seed) {
  if (n < 1) throw Error("the number of samples must be at least 1, got " + std::to_string(n));
  if (!can_sample_) throw Error("this model has no prior to sample from (a plain deterministic autoencoder)");
  torch::NoGradGuard no_grad;
  if (format_ == "aoti") {  // the same draw as the TorchScript archive's torch.Generator().manual_seed(seed)
    auto generator = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
    return decode(torch::randn({n, latent_dim_}, generator));
  }
  return module_.get_method("sample")({n, seed}).toTensor();
}

torch::Tensor load_tensor(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw Error("cannot open tensor file '" + path + "'");
  std::vector<char> bytes((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  try {
    torch::IValue value = torch::pickle_load(bytes);
    if (!value.isTensor()) throw Error("'" + path + "' holds no tensor (save one with torch.save(tensor, path))");
    return value.toTensor();
  } catch (const c10::Error& e) {
    throw Error("'" + path + "' is not a tensor file written by torch.save (" + first_line(e.what_without_backtrace()) + ")");
  }
}

void save_tensor(const torch::Tensor& tensor, const std::string& path) {
  std::vector<char> bytes = torch::pickle_save(tensor.contiguous());
  std::ofstream out(path, std::ios::binary);
  if (!out) throw Error("cannot write '" + path + "'");
  out.write(bytes.data(), static_cast<std::streamsize>(bytes.size()));
  if (!out) throw Error("cannot write '" + path + "'");
}

}  // namespace vaekit
