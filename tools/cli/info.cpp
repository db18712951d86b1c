// `moba info`: what this build of moba can run here.
#include <nlohmann/json.hpp>

#include "commands.hpp"

namespace moba::cli {

int info_command(const InfoOptions& o, std::ostream& out) {
  const Backend backends[] = {Backend::reference, Backend::cpu, Backend::cuda};
  const Backend automatic = backend_available(Backend::cuda) ? Backend::cuda : Backend::cpu;
  const int threads = effective_threads(0);
  const std::string cpu = describe_device(Placement::host);
  std::optional<std::string> gpu;
  if (backend_available(Backend::cuda)) gpu = describe_device(Placement::cuda);

  if (o.json) {
    nlohmann::ordered_json available = nlohmann::ordered_json::object();
    for (Backend b : backends) available[backend_name(b)] = backend_available(b);
    const nlohmann::ordered_json report = {
        {"command", "info"},
        {"version", version()},
        {"backends", available},
        {"auto_backend", backend_name(automatic)},
        {"hardware_threads", threads},
        {"cpu", cpu},
        {"cuda_device", gpu ? nlohmann::ordered_json(*gpu) : nlohmann::ordered_json(nullptr)}};
    out << report.dump(2) << '\n';
    return 0;
  }
  out << "moba " << version() << '\n' << "backends:";
  for (Backend b : backends)
    out << ' ' << backend_name(b) << (backend_available(b) ? " (yes)" : " (no)");
  out << "\nauto backend: " << backend_name(automatic) << '\n'
      << "hardware threads: " << threads << '\n'
      << "cpu: " << cpu << '\n'
      << "cuda device: " << (gpu ? *gpu : std::string("none")) << '\n';
  return 0;
}

}  // namespace moba::cli
