// switchyard: one binary, one subcommand per role or tool.
#include "apps/commands.hpp"

#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>

#include <unistd.h>

#include <cstdlib>
#include <string>

namespace {

/// The serving roles share their cores between the engine's OpenMP threads, the HTTP and actor
/// threads and the transport: OpenMP threads that spin between parallel regions starve the others
/// (measured on 2 cores, tiny model, 8 clients: 7 745 tokens/s spinning, 24 248 passive). libgomp
/// reads OMP_WAIT_POLICY once, when it loads — before main — so a serving command without one set
/// re-executes itself once with it set to passive. Setting OMP_WAIT_POLICY yourself overrides this.
void prefer_passive_openmp(int argc, char** argv) {
  if (std::getenv("OMP_WAIT_POLICY") != nullptr) return;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (!a.empty() && a[0] == '-') continue;  // -v, -vv
    if (a == "serve" || a == "router" || a == "expert-host") {
      ::setenv("OMP_WAIT_POLICY", "passive", 1);
      ::execv("/proc/self/exe", argv);  // returns only on failure: run on as we are
    }
    return;
  }
}

}  // namespace

int main(int argc, char** argv) {
  prefer_passive_openmp(argc, argv);
  CLI::App app{"Switchyard: serves Mixture-of-Experts models across machines"};
  app.require_subcommand(1);
  int verbosity = 0;
  app.add_flag("-v,--verbose", verbosity, "More log output (-v info, -vv debug)");
  app.parse_complete_callback([&] {
    spdlog::set_level(verbosity >= 2 ? spdlog::level::debug : verbosity == 1 ? spdlog::level::info : spdlog::level::warn);
  });
  sy::apps::add_model_commands(app);
  sy::apps::add_serve_command(app);
  sy::apps::add_cluster_commands(app);
  sy::apps::add_plan_command(app);
  sy::apps::add_ctl_commands(app);
  sy::apps::add_tokenize_command(app);
  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    return app.exit(e);
  }
  return 0;
}
