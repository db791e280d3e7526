// C++ tests of the runtime, run by ctest. The model comes from VAEKIT_TEST_MODEL, an absolute path
// (ctest runs the tests in the build directory; the Python parity tests export one and set it);
// without it the tests that need a model are skipped. A .pt2 package is loaded with
// trust_native_code, after checking that it is refused without.
#include "vaekit/runtime.h"

#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <functional>
#include <iostream>
#include <string>

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  std::cout << (ok ? "ok   " : "FAIL ") << what << "\n";
  if (!ok) ++failures;
}

bool throws_error_containing(const std::function<void()>& f, const std::string& fragment) {
  try {
    f();
  } catch (const vaekit::Error& e) {
    std::cout << "     vaekit::Error: " << e.what() << "\n";
    return std::string(e.what()).find(fragment) != std::string::npos;
  }
  return false;
}

}  // namespace

int main() {
  check(throws_error_containing([] { vaekit::Model::load("/nonexistent/model.pt"); }, "cannot open"),
        "a missing model file is a vaekit::Error");
  const std::string junk = "vaekit_runtime_test_junk.pt";
  { std::ofstream(junk) << "not a model"; }
  check(throws_error_containing([&] { vaekit::Model::load(junk); }, "not a TorchScript archive"),
        "a junk file is rejected");
  check(throws_error_containing([&] { vaekit::load_tensor(junk); }, "not a tensor file"),
        "a junk tensor file is rejected");
  std::remove(junk.c_str());

  const std::string tensor_file = "vaekit_runtime_test_tensor.pt";
  torch::Tensor t = torch::arange(6, torch::kFloat).view({2, 3});
  vaekit::save_tensor(t, tensor_file);
  check(torch::equal(vaekit::load_tensor(tensor_file), t), "tensor files round-trip");
  std::remove(tensor_file.c_str());

  const char* path = std::getenv("VAEKIT_TEST_MODEL");
  if (path == nullptr) {
    std::cout << "skip model tests: VAEKIT_TEST_MODEL is not set\n";
  } else if (path[0] != '/') {
    check(false, "VAEKIT_TEST_MODEL is an absolute path (ctest runs the tests in the build directory), got '" +
                     std::string(path) + "'");
  } else try {
    vaekit::LoadOptions options;
    const std::string model_path = path;
    if (model_path.size() > 4 && model_path.compare(model_path.size() - 4, 4, ".pt2") == 0) {
      check(throws_error_containing([&] { vaekit::Model::load(path); }, "--trust-native-code"),
            "a .pt2 package is refused without trust_native_code");
      options.trust_native_code = true;
    }
    vaekit::Model model = vaekit::Model::load(path, options);
    std::vector<int64_t> shape{3};
    shape.insert(shape.end(), model.input_shape().begin(), model.input_shape().end());
    torch::Tensor x = torch::rand(shape);
    if (model.conditional()) {  // an archive of `vaekit run --condition label`: every method takes the labels
      const int64_t k = model.num_classes();
      torch::Tensor c = torch::tensor({int64_t{0}, k - 1, int64_t{1} % k});
      auto [mu, logvar] = model.encode(x, c);
      check(mu.size(0) == 3 && mu.size(1) == model.latent_dim(), "conditional encode gives [B, d]");
      check(torch::allclose(model.reconstruct(x, c), model.decode(mu, c)), "conditional reconstruct is decode of the mean");
      check(!torch::equal(model.decode(mu, c), model.decode(mu, (c + 1) % k)), "the decoder reads the label");
      check(torch::equal(model.sample(4, 7, 1), model.sample(4, 7, 1)), "conditional sample is reproducible");
      check(throws_error_containing([&] { model.encode(x); }, "pass the labels"),
            "the unconditional form on a conditional model is a vaekit::Error");
      check(throws_error_containing([&] { model.sample(4, 7); }, "pass the labels"),
            "sample without a label on a conditional model is a vaekit::Error");
      check(throws_error_containing([&] { model.reconstruct(x, c + k); }, "out of range"),
            "a label out of range is a vaekit::Error");
      check(throws_error_containing([&] { model.sample(2, 0, k); }, "out of range"),
            "sample with a label out of range is a vaekit::Error");
      check(throws_error_containing([&] { model.decode(mu, c.slice(0, 0, 2)); }, "wrong labels"),
            "one label per row");
      std::cout << (failures ? "FAILED" : "all passed") << "\n";
      return failures ? 1 : 0;
    }
    check(model.num_classes() == 0, "an unconditional model has no classes");
    check(throws_error_containing([&] { model.sample(2, 0, 1); }, "not conditional"),
          "a label for an unconditional model is a vaekit::Error");
    auto [mu, logvar] = model.encode(x);
    check(mu.size(0) == 3 && mu.size(1) == model.latent_dim(), "encode gives [B, d]");
    check(torch::allclose(model.reconstruct(x), model.decode(mu)), "reconstruct is decode of the mean");
    check(torch::equal(model.sample(4, 7), model.sample(4, 7)), "sample is reproducible for a seed");
    check(!torch::equal(model.sample(4, 7), model.sample(4, 8)), "different seeds give different samples");
    check(model.config_json().find("\"encoder\"") != std::string::npos, "config.json rides in the archive");
    check(throws_error_containing([&] { model.encode(torch::rand({2, 5})); }, "wrong input shape"),
          "a wrongly shaped input is a vaekit::Error");
    check(throws_error_containing([&] { model.decode(torch::rand({2, model.latent_dim() + 1})); }, "wrong latent shape"),
          "a wrongly shaped code is a vaekit::Error");
    check(throws_error_containing([&] { model.encode(x.to_sparse()); }, "encode failed"),
          "an error inside the model is a vaekit::Error");
    check(throws_error_containing([&] { model.sample(0, 0); }, "at least 1"), "sample(0) is a vaekit::Error");
    check(throws_error_containing([&] { model.sample(int64_t{1} << 50, 0); }, "more than this machine's memory"),
          "sample(2^50) is a vaekit::Error, not an allocation attempt");
  } catch (const vaekit::Error& e) {
    check(false, std::string("no vaekit::Error with the model: ") + e.what());
  }
  std::cout << (failures ? "FAILED" : "all passed") << "\n";
  return failures ? 1 : 0;
}
