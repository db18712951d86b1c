// `moba`: run, check and inspect MoBA from the command line. This file only
// wires the command line (CLI11) to the commands and maps errors to exit
// statuses: 0 success, 1 failure (unreadable file, failed check, backend
// error), 2 bad command line.
#include <CLI/CLI.hpp>
#include <iostream>
#include <new>
#include <string>

#include "check.hpp"
#include "commands.hpp"
#include "errors.hpp"

namespace {

using namespace moba::cli;

constexpr int kFailure = 1;
constexpr int kUsage = 2;

// Values whose absence matters (no --softmax-scale means 1/sqrt(head_dim)).
struct Unset {
  double softmax_scale = 0.0;
  CLI::Option* scale_option = nullptr;
};

void add_workload_options(CLI::App* cmd, WorkloadOptions& w) {
  const std::string generated = "Generated inputs (random normal)";
  const std::string loaded = "Loaded inputs";
  auto* tokens = cmd->add_option("--tokens", w.tokens, "tokens per sequence")
                     ->capture_default_str()
                     ->group(generated);
  auto* batch = cmd->add_option("--batch", w.batch, "sequences of --tokens each")
                    ->capture_default_str()
                    ->group(generated);
  auto* seqlens = cmd->add_option("--seqlens", w.seqlens,
                                  "varlen batch, e.g. 100,0,4096 (replaces --tokens/--batch)")
                      ->delimiter(',')
                      ->group(generated);
  seqlens->excludes(tokens)->excludes(batch);
  auto* heads_q = cmd->add_option("--heads-q", w.heads_q, "query heads")
                      ->capture_default_str()
                      ->group(generated);
  auto* heads_kv = cmd->add_option("--heads-kv", w.heads_kv, "key/value heads (GQA)")
                       ->capture_default_str()
                       ->group(generated);
  auto* head_dim = cmd->add_option("--head-dim", w.head_dim, "head dimension")
                       ->capture_default_str()
                       ->group(generated);
  cmd->add_option("--seed", w.seed, "random seed")->capture_default_str()->group(generated);
  cmd->add_option("--dtype", w.dtype,
                  "float32, float16 or bfloat16 (default: the q file's dtype; generated: bfloat16 "
                  "on cuda, else float32)");

  auto* q = cmd->add_option("--q", w.q_path,
                            "q as .npy: [tokens, heads, dim] or [batch, tokens, heads, dim]")
                ->group(loaded);
  auto* k = cmd->add_option("--k", w.k_path, "k as .npy")->group(loaded);
  auto* v = cmd->add_option("--v", w.v_path, "v as .npy")->group(loaded);
  q->needs(k)->needs(v);
  k->needs(q);
  v->needs(q);
  auto* st =
      cmd->add_option("--safetensors", w.safetensors_path, "q, k, v from one .safetensors file")
          ->group(loaded);
  st->excludes(q)->excludes(k)->excludes(v);
  for (auto* name :
       {cmd->add_option("--q-name", w.q_name, "tensor name of q in --safetensors")
            ->capture_default_str(),
        cmd->add_option("--k-name", w.k_name, "tensor name of k")->capture_default_str(),
        cmd->add_option("--v-name", w.v_name, "tensor name of v")->capture_default_str()})
    name->needs(st)->group(loaded);
  cmd->add_option("--cu-seqlens", w.cu_seqlens,
                  "varlen offsets of loaded 3-D inputs, e.g. 0,100,300")
      ->delimiter(',')
      ->group(loaded);
  cmd->add_option("--cu-seqlens-k", w.cu_seqlens_k,
                  "offsets of the keys when they differ from the queries")
      ->delimiter(',')
      ->group(loaded);
  // Shapes come from the files when inputs are loaded.
  for (auto* shape : {tokens, batch, seqlens, heads_q, heads_kv, head_dim})
    shape->excludes(q)->excludes(st);
}

void add_attention_options(CLI::App* cmd, AttentionOptions& a, Unset& unset,
                           const std::string& default_backend) {
  a.backend = default_backend;
  cmd->add_option("--block-size", a.block_size, "keys per block")->capture_default_str();
  cmd->add_option("--top-k", a.top_k, "blocks per query, counting its current block")
      ->capture_default_str();
  unset.scale_option = cmd->add_option("--softmax-scale", unset.softmax_scale,
                                       "softmax scale (default 1/sqrt(head_dim))");
  cmd->add_flag("--shared-routing", a.shared_routing,
                "query heads of a kv group share one selection");
  cmd->add_option("--backend", a.backend, "auto, reference, cpu or cuda")->capture_default_str();
  cmd->add_option("--threads", a.threads, "cpu backend threads (0 = all)")->capture_default_str();
}

void apply_unset(const Unset& unset, AttentionOptions& a) {
  if (unset.scale_option && unset.scale_option->count() > 0) a.softmax_scale = unset.softmax_scale;
}

Progress::Mode progress_mode(bool forced, bool off) {
  return off ? Progress::Mode::off : forced ? Progress::Mode::forced : Progress::Mode::automatic;
}

int report(const std::string& message, int status) {
  // Library messages already carry the prefix.
  std::cerr << (message.rfind("moba: ", 0) == 0 ? message : "moba: " + message) << '\n';
  return status;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"moba: Mixture of Block Attention, from the command line", "moba"};
  app.set_version_flag("--version", std::string("moba ") + moba::version());
  // At most one; "none" is reported below, after CLI11 has had the chance to
  // name an unknown word (`moba frobnicate`) as such.
  app.require_subcommand(0, 1);

  RunOptions run;
  Unset run_unset;
  bool run_progress = false, run_no_progress = false, no_dense = false;
  auto* run_cmd =
      app.add_subcommand("run", "time MoBA against dense causal attention on one workload");
  add_workload_options(run_cmd, run.workload);
  add_attention_options(run_cmd, run.attention, run_unset, "auto");
  run_cmd->add_option("--repeats", run.repeats, "timed calls (the median is reported)")
      ->capture_default_str();
  run_cmd->add_option("--warmup", run.warmup, "untimed calls first")->capture_default_str();
  run_cmd->add_flag("--no-dense", no_dense, "skip the dense comparison");
  run_cmd->add_flag("--backward", run.backward, "also time the backward pass (random dout)");
  run_cmd->add_flag("--decode", run.decode,
                    "time decode steps against a KV cache of --tokens context (cpu)");
  run_cmd->add_option("--decode-steps", run.decode_steps, "timed decode steps with --decode")
      ->capture_default_str();
  run_cmd->add_flag("--json", run.json, "one JSON object on stdout");
  run_cmd->add_option("--out", run.out_path,
                      "save the output: .npy, or .safetensors (out and lse)");
  run_cmd->add_flag("--progress", run_progress,
                    "show progress on stderr even when it is not a terminal");
  run_cmd->add_flag("--no-progress", run_no_progress, "never show progress");

  CheckOptions check;
  bool check_progress = false, check_no_progress = false;
  auto* check_cmd =
      app.add_subcommand("check", "compare a backend against the reference on a sweep of shapes");
  check_cmd
      ->add_option("--backend", check.backend, "backend to check: auto, reference, cpu or cuda")
      ->capture_default_str();
  check_cmd
      ->add_option("--cases", check.cases,
                   "cases to run (the first " + std::to_string(builtin_case_count()) +
                       " are built in, more are random shapes)")
      ->capture_default_str();
  check_cmd->add_option("--seed", check.seed, "random seed of the data and extra shapes")
      ->capture_default_str();
  check_cmd->add_flag("--backward", check.backward, "also compare the gradients");
  check_cmd->add_option("--threads", check.threads, "cpu backend threads (0 = all)")
      ->capture_default_str();
  check_cmd->add_flag("--json", check.json, "one JSON object on stdout");
  check_cmd->add_flag("--progress", check_progress,
                      "show progress on stderr even when it is not a terminal");
  check_cmd->add_flag("--no-progress", check_no_progress, "never show progress");

  RoutingOptions routing;
  routing.workload.tokens = 64;
  routing.workload.heads_q = 2;
  routing.workload.heads_kv = 1;
  routing.workload.head_dim = 64;
  routing.attention.block_size = 16;
  routing.attention.top_k = 3;
  Unset routing_unset;
  auto* routing_cmd = app.add_subcommand("routing", "print the blocks each query and head selects");
  add_workload_options(routing_cmd, routing.workload);
  add_attention_options(routing_cmd, routing.attention, routing_unset, "auto");
  routing_cmd->add_flag("--json", routing.json, "one JSON object on stdout");

  InfoOptions info;
  auto* info_cmd = app.add_subcommand("info", "version, backends and threads");
  info_cmd->add_flag("--json", info.json, "one JSON object on stdout");

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    if (e.get_exit_code() == 0) return app.exit(e);  // --help, --version
    std::cerr << "moba: " << e.what() << "\nRun with --help for more information.\n";
    return kUsage;
  }

  try {
    if (*run_cmd) {
      apply_unset(run_unset, run.attention);
      run.dense = !no_dense;
      run.progress = progress_mode(run_progress, run_no_progress);
      return run_command(run, std::cout);
    }
    if (*check_cmd) {
      check.progress = progress_mode(check_progress, check_no_progress);
      return check_command(check, std::cout);
    }
    if (*routing_cmd) {
      apply_unset(routing_unset, routing.attention);
      return routing_command(routing, std::cout);
    }
    if (*info_cmd) return info_command(info, std::cout);
    return report("expected a subcommand: run, check, routing or info (see moba --help)", kUsage);
  } catch (const UsageError& e) {
    return report(e.what(), kUsage);
  } catch (const FileError& e) {
    return report(e.what(), kFailure);
  } catch (const moba::Error& e) {
    // Invalid or unsupported problem descriptions come from the arguments
    // (or the files' shapes); anything else failed while running.
    const bool usage =
        e.status() == moba::Status::invalid_argument || e.status() == moba::Status::unsupported;
    return report(e.what(), usage ? kUsage : kFailure);
  } catch (const std::bad_alloc&) {
    return report("out of memory", kFailure);
  } catch (const std::exception& e) {
    return report(e.what(), kFailure);
  }
}
