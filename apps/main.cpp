// switchyard: one binary, one subcommand per role or tool.
#include "apps/commands.hpp"

#include <spdlog/spdlog.h>

#include <CLI/CLI.hpp>

int main(int argc, char** argv) {
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
