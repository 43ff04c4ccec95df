#pragma once
#include <CLI/CLI.hpp>

namespace sy::apps {

/// Registers the model subcommands (logits, generate, make-model, inspect) on `app`.
void add_model_commands(CLI::App& app);
/// Registers `serve` (the embedded cluster behind the HTTP API).
void add_serve_command(CLI::App& app);
/// Registers the cluster's processes: `coordinator`, `expert-host`, `router`.
void add_cluster_commands(CLI::App& app);
/// Registers `plan` (the expert placement planner on a load file).
void add_plan_command(CLI::App& app);
/// Registers `ctl` (operator commands against a router's admin routes).
void add_ctl_commands(CLI::App& app);
/// Registers `tokenize` (text ↔ token ids through a tokenizer.json).
void add_tokenize_command(CLI::App& app);

}  // namespace sy::apps
