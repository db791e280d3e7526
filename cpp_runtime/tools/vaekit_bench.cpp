// vaekit-bench MODEL --batch B [--iters N] [--trust-native-code]: median latency of encode and decode, printed as
// one JSON line. A .pt2 package needs --trust-native-code (see vaekit::LoadOptions).
#include "vaekit/runtime.h"

#include <algorithm>
#include <chrono>
#include <iostream>
#include <string>
#include <vector>

namespace {

template <typename F>
double median_us(F&& f, int iters) {
  for (int i = 0; i < 5; ++i) f();
  std::vector<double> times;
  for (int i = 0; i < iters; ++i) {
    auto start = std::chrono::steady_clock::now();
    f();
    times.push_back(std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - start).count());
  }
  std::sort(times.begin(), times.end());
  return times[times.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 2) { std::cerr << "usage: vaekit-bench MODEL --batch B [--iters N] [--trust-native-code]\n"; return 2; }
  int64_t batch = 1;
  int iters = 200;
  vaekit::LoadOptions options;
  for (int i = 2; i < argc; ++i) {
    std::string key = argv[i];
    if (key == "--trust-native-code") options.trust_native_code = true;
    else if (key == "--batch" && i + 1 < argc) batch = std::stoll(argv[++i]);
    else if (key == "--iters" && i + 1 < argc) iters = std::stoi(argv[++i]);
    else { std::cerr << "error: unknown option " << key << "\n"; return 2; }
  }
  try {
    vaekit::Model model = vaekit::Model::load(argv[1], options);
    std::vector<int64_t> shape{batch};
    shape.insert(shape.end(), model.input_shape().begin(), model.input_shape().end());
    torch::Tensor x = torch::rand(shape), z = torch::randn({batch, model.latent_dim()});
    double enc = median_us([&] { model.encode(x); }, iters);
    double dec = median_us([&] { model.decode(z); }, iters);
    std::cout << "{\"format\": \"" << model.format() << "\", \"batch\": " << batch << ", \"encode_us\": " << enc
              << ", \"decode_us\": " << dec << "}\n";
  } catch (const vaekit::Error& e) {
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
  return 0;
}
