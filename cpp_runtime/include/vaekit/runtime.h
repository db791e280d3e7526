// vaekit runtime: run a model exported by `vaekit export` with libtorch alone: a TorchScript
// archive (.pt) or, when built with VAEKIT_WITH_AOTI (the default) and explicitly trusted, an
// AOTInductor package (.pt2).
//
//   vaekit::Model model = vaekit::Model::load("model.pt");      // throws vaekit::Error
//   auto [mu, logvar] = model.encode(x);                          // x: [B, C, H, W] float32
//   torch::Tensor images = model.sample(/*n=*/16, /*seed=*/0);    // same samples as Python
//
// A conditional VAE (trained with `vaekit run --condition label`) takes the class labels too:
//   auto [mu, logvar] = model.encode(x, c);                       // c: [B] int64 in 0..num_classes()-1
//   torch::Tensor threes = model.sample(16, 0, /*label=*/3);
#pragma once

#include <torch/script.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

namespace vaekit {

// Every failure of the runtime (missing file, not a vaekit archive, wrong input shape, a libtorch
// error, running out of memory) is an Error with a one-line message: no function below throws
// anything else.
class Error : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct LoadOptions {
  // An AOTInductor package (.pt2) is a shared library compiled by Inductor: loading it runs the
  // native code inside it (its constructors run as it is loaded) with this program's rights, so a
  // crafted package can do anything. load() refuses a .pt2 unless this is set; set it only for
  // packages you trust as much as a program you would run. A TorchScript archive (.pt) holds no
  // native code and needs no trust.
  bool trust_native_code = false;
};

class Model {
 public:
  // Load an archive written by `vaekit export` (.pt2: the AOTInductor package, which needs
  // options.trust_native_code). Throws Error if the file is missing, unreadable or not an exported
  // vaekit model (a run directory or its model.safetensors: run `vaekit export RUN_DIR` first).
  static Model load(const std::string& path, const LoadOptions& options = {});
  // "torchscript" or "aoti".
  const std::string& format() const { return format_; }

  // The run's config.json, as exported.
  const std::string& config_json() const { return config_json_; }
  // Shape of one sample, e.g. {1, 28, 28}; inputs are [B, ...this shape].
  const std::vector<int64_t>& input_shape() const { return input_shape_; }
  int64_t latent_dim() const { return latent_dim_; }
  // True for a deterministic autoencoder: encode returns (z, an empty [B, 0] tensor).
  bool deterministic() const { return deterministic_; }
  bool can_sample() const { return can_sample_; }
  // The number of class labels K of a conditional VAE (`vaekit run --condition label`; Sohn et al. 2015),
  // 0 for an unconditional model. A conditional model needs the overloads below that take labels; calling
  // the unconditional form on it, or the conditional form on an unconditional model, throws Error.
  int64_t num_classes() const { return num_classes_; }
  bool conditional() const { return num_classes_ > 0; }

  // x [B, *input_shape] -> (mu [B, d], logvar [B, d]); with a latent transform (sparse, k-sparse codes)
  // mu is transform(posterior mean), the features Python's embed gives.
  std::pair<torch::Tensor, torch::Tensor> encode(const torch::Tensor& x);
  // codes [B, d] (as encode returns them; no transform is applied) -> the likelihood's mean [B, *input_shape].
  torch::Tensor decode(const torch::Tensor& z);
  // x -> decode of the code the decoder reads: decode(mu), except for a k-sparse AE with alpha > 1
  // (TorchScript only), whose encode gives alpha*k units and whose reconstruct decodes the k-unit code.
  torch::Tensor reconstruct(const torch::Tensor& x);
  // n samples decoded from transform(z), z ~ N(0, I) drawn with a generator seeded with `seed`; n >= 1,
  // and the output must fit in this machine's memory.
  torch::Tensor sample(int64_t n, int64_t seed);

  // The conditional forms (conditional() models only): c [B] integer labels in 0..num_classes()-1, one per
  // row of x or z (converted to int64); sample draws as above and decodes every z with the one `label`.
  std::pair<torch::Tensor, torch::Tensor> encode(const torch::Tensor& x, const torch::Tensor& c);
  torch::Tensor decode(const torch::Tensor& z, const torch::Tensor& c);
  torch::Tensor reconstruct(const torch::Tensor& x, const torch::Tensor& c);
  torch::Tensor sample(int64_t n, int64_t seed, int64_t label);

 private:
  torch::jit::Module module_;
  std::shared_ptr<void> aoti_encode_, aoti_decode_;  // AOTIModelPackageLoader, when format_ == "aoti"
  std::string format_ = "torchscript";
  std::string config_json_;
  std::vector<int64_t> input_shape_;
  int64_t latent_dim_ = 0;
  bool deterministic_ = false;
  bool can_sample_ = false;
  int64_t num_classes_ = 0;
  std::string sample_error_ = "this model cannot sample";  // why not, as the exporter recorded it

  static Model load_torchscript(const std::string& path);
  static Model load_aoti(const std::string& path);
  torch::Tensor run_aoti(const std::shared_ptr<void>& loader, const torch::Tensor& input);
  void check_input(const torch::Tensor& x) const;
  void check_latent(const torch::Tensor& z) const;
  void check_sample(int64_t n) const;
  void require_conditional(bool wanted, const std::string& method) const;
  torch::Tensor check_labels(const torch::Tensor& c, int64_t batch) const;
};

// Tensor files: what Python's torch.save writes (read with torch::pickle_load), and the reverse.
torch::Tensor load_tensor(const std::string& path);
void save_tensor(const torch::Tensor& tensor, const std::string& path);

}  // namespace vaekit
