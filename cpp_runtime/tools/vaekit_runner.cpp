// vaekit-runner MODEL {encode|decode|reconstruct|sample} [--in FILE] --out FILE [-n N] [--seed S]
//               [--label L] [--labels FILE] [--trust-native-code]
//
// A conditional model (`vaekit run --condition label`) needs the labels: --label L for sample, --labels
// FILE (a tensor file of [B] integer labels) for encode, decode and reconstruct; an unconditional model
// refuses them.
// Tensor files are what Python's torch.save writes and torch.load reads. encode writes a tuple
// (mu, logvar) as two files: OUT and OUT with ".logvar" inserted before the extension. An
// AOTInductor package (.pt2) runs native code when it is loaded: it needs --trust-native-code.
// Exit code 0 on success; 1 and one line on stderr on bad input; 2 on bad usage.
#include "vaekit/runtime.h"

#include <cerrno>
#include <cstdlib>
#include <iostream>
#include <map>
#include <string>

namespace {

int usage(const std::string& message) {
  std::cerr << "error: " << message << "\n"
            << "usage: vaekit-runner MODEL {encode|decode|reconstruct|sample} [--in FILE] --out FILE [-n N] [--seed S]"
               " [--label L] [--labels FILE] [--trust-native-code]\n";
  return 2;
}

std::string with_suffix(const std::string& path, const std::string& suffix) {
  auto dot = path.find_last_of('.');
  auto slash = path.find_last_of('/');
  if (dot == std::string::npos || (slash != std::string::npos && dot < slash)) return path + suffix;
  return path.substr(0, dot) + suffix + path.substr(dot);
}

int64_t parse_int(const std::string& text, const std::string& what) {
  char* end = nullptr;
  errno = 0;
  long long value = std::strtoll(text.c_str(), &end, 10);
  if (text.empty() || *end != '\0') throw vaekit::Error(what + " must be an integer, got '" + text + "'");
  if (errno == ERANGE) throw vaekit::Error(what + " is out of range, got " + text);
  return value;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc < 3) return usage("expected a model file and a command");
  const std::string model_path = argv[1], command = argv[2];
  std::map<std::string, std::string> options;
  vaekit::LoadOptions load_options;
  for (int i = 3; i < argc; ++i) {
    std::string key = argv[i];
    if (key == "--trust-native-code") {
      load_options.trust_native_code = true;
      continue;
    }
    if (key != "--in" && key != "--out" && key != "-n" && key != "--seed" && key != "--label" && key != "--labels") {
      return usage("unknown option " + key);
    }
    if (i + 1 >= argc) return usage(key + " needs a value");
    options[key] = argv[++i];
  }
  if (!options.count("--out")) return usage("--out FILE is required");
  try {
    vaekit::Model model = vaekit::Model::load(model_path, load_options);
    const std::string out = options["--out"];
    if (command == "sample") {
      int64_t n = options.count("-n") ? parse_int(options["-n"], "-n") : 16;
      int64_t seed = options.count("--seed") ? parse_int(options["--seed"], "--seed") : 0;
      if (options.count("--label")) {
        vaekit::save_tensor(model.sample(n, seed, parse_int(options["--label"], "--label")), out);
      } else {
        vaekit::save_tensor(model.sample(n, seed), out);
      }
      return 0;
    }
    if (command != "encode" && command != "decode" && command != "reconstruct") {
      return usage("unknown command '" + command + "'");
    }
    if (!options.count("--in")) return usage(command + " needs --in FILE");
    torch::Tensor input = vaekit::load_tensor(options["--in"]);
    if (options.count("--labels")) {
      torch::Tensor labels = vaekit::load_tensor(options["--labels"]);
      if (command == "encode") {
        auto [mu, logvar] = model.encode(input, labels);
        vaekit::save_tensor(mu, out);
        vaekit::save_tensor(logvar, with_suffix(out, ".logvar"));
      } else if (command == "decode") {
        vaekit::save_tensor(model.decode(input, labels), out);
      } else {
        vaekit::save_tensor(model.reconstruct(input, labels), out);
      }
    } else if (command == "encode") {
      auto [mu, logvar] = model.encode(input);
      vaekit::save_tensor(mu, out);
      vaekit::save_tensor(logvar, with_suffix(out, ".logvar"));
    } else if (command == "decode") {
      vaekit::save_tensor(model.decode(input), out);
    } else {
      vaekit::save_tensor(model.reconstruct(input), out);
    }
    return 0;
  } catch (const vaekit::Error& e) {  // the runtime throws nothing else
    std::cerr << "error: " << e.what() << "\n";
    return 1;
  }
}
