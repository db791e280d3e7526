// Embedding the vaekit runtime in a C++ program: encode images, generate new ones.
// Build: see cpp_runtime/README.md (this file is compiled by CI as the README's example).
#include <vaekit/runtime.h>

#include <iostream>

int main(int argc, char** argv) {
  if (argc != 2) { std::cerr << "usage: vaekit-embed-example MODEL.pt\n"; return 2; }
  try {
    vaekit::Model model = vaekit::Model::load(argv[1]);
    std::vector<int64_t> shape{4};
    shape.insert(shape.end(), model.input_shape().begin(), model.input_shape().end());
    torch::Tensor x = torch::rand(shape);                 // four inputs in [0, 1]
    auto [mu, logvar] = model.encode(x);                  // features for your own model
    torch::Tensor images = model.sample(/*n=*/8, /*seed=*/42);
    std::cout << "codes " << mu.sizes() << ", samples " << images.sizes() << "\n";
  } catch (const vaekit::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
