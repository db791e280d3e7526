#include "vaekit/runtime.h"

#include <torch/serialize.h>

#include <fstream>
#include <iterator>
#include <sstream>

namespace vaekit {
namespace {

constexpr const char* kFormat = "vaekit-torchscript/1";

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
  auto out = module_.get_method("encode")({x.to(torch::kFloat)}).toTuple();
  return {out->elements()[0].toTensor(), out->elements()[1].toTensor()};
}

torch::Tensor Model::decode(const torch::Tensor& z) {
  check_latent(z);
  torch::NoGradGuard no_grad;
  return module_.get_method("decode")({z.to(torch::kFloat)}).toTensor();
}

torch::Tensor Model::reconstruct(const torch::Tensor& x) {
  check_input(x);
  torch::NoGradGuard no_grad;
  return module_.get_method("reconstruct")({x.to(torch::kFloat)}).toTensor();
}

torch::Tensor Model::sample(int64_t n, int64_t seed) {
  if (n < 1) throw Error("the number of samples must be at least 1, got " + std::to_string(n));
  if (!can_sample_) throw Error("this model has no prior to sample from (a plain deterministic autoencoder)");
  torch::NoGradGuard no_grad;
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
