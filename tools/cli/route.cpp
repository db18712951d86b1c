// `moba routing`: the blocks each query and head selects, for debugging
// routing on small workloads.
#include <nlohmann/json.hpp>

#include "commands.hpp"
#include "core/routing.hpp"
#include "errors.hpp"

namespace moba::cli {

int routing_command(const RoutingOptions& o, std::ostream& out) {
  const Backend backend = resolve_backend(o.attention.backend);
  const Placement placement = placement_for(backend);
  const ExecOptions exec = make_exec_options(o.attention, backend);
  const WorkloadOptions workload_options =
      workload_options_for(o.workload, backend, o.attention.threads);
  const Config config = make_config(o.attention);
  const Workload w = make_workload(workload_options);
  const int64_t width = std::max<int64_t>(routing_width(w.max_len_k, config), 1);
  // Every selection is printed; beyond this the listing is useless anyway.
  constexpr int64_t kMaxEntries = int64_t{1} << 22;
  if (w.total_q * w.heads_q * width > kMaxEntries)
    throw UsageError("routing: " + std::to_string(w.total_q) + " queries x " +
                     std::to_string(w.heads_q) +
                     " heads is too much to print; use fewer --tokens or heads");

  const PlacedWorkload placed = place(w, placement);
  const PlacedTensor selected = make_tensor(placement, DType::int32, {w.total_q, w.heads_q, width});
  routing(placed.inputs, config, selected.view, exec);
  std::vector<int32_t> blocks(static_cast<size_t>(w.total_q * w.heads_q * width));
  selected.buffer.download(blocks.data(), blocks.size() * sizeof(int32_t));
  const auto selection = [&](int64_t row, int64_t head) {
    std::vector<int32_t> s;
    const int32_t* p = blocks.data() + (row * w.heads_q + head) * width;
    for (int64_t m = 0; m < width && p[m] >= 0; ++m) s.push_back(p[m]);
    return s;
  };

  const std::vector<int64_t> lens_q = w.lens_q(), lens_k = w.lens_k();
  if (o.json) {
    nlohmann::ordered_json sequences = nlohmann::ordered_json::array();
    for (int64_t b = 0; b < w.batch(); ++b) {
      nlohmann::ordered_json queries = nlohmann::ordered_json::array();
      const int64_t offset = lens_k[static_cast<size_t>(b)] - lens_q[static_cast<size_t>(b)];
      for (int64_t i = 0; i < lens_q[static_cast<size_t>(b)]; ++i) {
        nlohmann::ordered_json heads = nlohmann::ordered_json::array();
        for (int64_t h = 0; h < w.heads_q; ++h) heads.push_back(selection(w.cu_q[b] + i, h));
        queries.push_back({{"position", offset + i}, {"selected", heads}});
      }
      sequences.push_back(
          {{"index", b},
           {"len_q", lens_q[static_cast<size_t>(b)]},
           {"len_k", lens_k[static_cast<size_t>(b)]},
           {"blocks", core::num_blocks(lens_k[static_cast<size_t>(b)], config.block_size)},
           {"queries", queries}});
    }
    const nlohmann::ordered_json report = {{"command", "routing"},
                                           {"version", version()},
                                           {"backend", backend_name(backend)},
                                           {"config",
                                            {{"block_size", config.block_size},
                                             {"top_k", config.top_k},
                                             {"shared_routing", config.gqa_shared_routing},
                                             {"heads_q", w.heads_q},
                                             {"heads_kv", w.heads_kv},
                                             {"head_dim", w.head_dim},
                                             {"dtype", dtype_name(w.dtype)},
                                             {"source", w.source}}},
                                           {"sequences", sequences}};
    out << report.dump(2) << '\n';
    return 0;
  }

  out << "moba " << version() << " routing: backend " << backend_name(backend) << ", block "
      << config.block_size << ", top-k " << config.top_k
      << (config.gqa_shared_routing ? ", shared routing" : "")
      << "; selected blocks per query head\n";
  for (int64_t b = 0; b < w.batch(); ++b) {
    const int64_t len_q = lens_q[static_cast<size_t>(b)], len_k = lens_k[static_cast<size_t>(b)];
    out << "sequence " << b << ": " << len_q << " queries, " << len_k << " keys, "
        << core::num_blocks(len_k, config.block_size) << " blocks\n";
    for (int64_t i = 0; i < len_q; ++i) {
      out << "  pos " << (len_k - len_q + i) << ':';
      for (int64_t h = 0; h < w.heads_q; ++h) {
        out << "  h" << h << " [";
        const std::vector<int32_t> s = selection(w.cu_q[b] + i, h);
        for (size_t m = 0; m < s.size(); ++m) out << (m ? " " : "") << s[m];
        out << ']';
      }
      out << '\n';
    }
  }
  return 0;
}

}  // namespace moba::cli
