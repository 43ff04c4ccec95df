// Model tools: logits, generate, make-model, inspect.
#include "apps/cli.hpp"
#include "apps/commands.hpp"
#include "apps/progress.hpp"
#include "model/generate.hpp"
#include "model/kernels.hpp"
#include "model/make_model.hpp"
#include "model/safetensors.hpp"
#include "model/weights.hpp"

#include <spdlog/spdlog.h>

#include <cstdio>
#include <memory>
#include <sstream>

namespace sy::apps {

namespace {

namespace m = sy::model;

std::unique_ptr<m::model_weights> load_or_fail(const std::string& dir) {
  progress_printer progress("loading weights");
  m::load_options opts;
  opts.progress = std::ref(progress);
  opts.notice = [](const std::string& msg) { spdlog::info("{}", msg); };
  auto w = m::load_model(dir, opts);
  if (!w) fail(m::describe(w.error()));
  spdlog::info("loaded {} ({} layers, {} experts, top-{})", dir, (*w)->config.num_layers,
               (*w)->config.gating.num_experts, (*w)->config.gating.top_k);
  return std::move(*w);
}

/// input_ids [B, T] from a safetensors file.
std::vector<std::vector<int32_t>> read_input_ids(const std::string& path) {
  auto f = m::safetensors_file::open(path);
  if (!f) fail(m::describe(f.error()));
  const auto* t = (*f)->find("input_ids");
  if (!t) fail(path + ": missing tensor 'input_ids'");
  if (t->shape.size() != 2 || t->shape[0] < 1 || t->shape[1] < 1)
    fail(path + ": tensor 'input_ids' must be [batch, tokens], got " + t->shape_string());
  auto v = m::read_i64(*t);
  if (!v) fail(m::describe(v.error()));
  std::vector<std::vector<int32_t>> out(static_cast<size_t>(t->shape[0]));
  for (int64_t b = 0; b < t->shape[0]; ++b)
    for (int64_t i = 0; i < t->shape[1]; ++i) {
      const int64_t id = (*v)[static_cast<size_t>(b * t->shape[1] + i)];
      if (id < 0 || id > INT32_MAX) fail(path + ": tensor 'input_ids' holds invalid token id " + std::to_string(id));
      out[static_cast<size_t>(b)].push_back(static_cast<int32_t>(id));
    }
  return out;
}

std::vector<int32_t> parse_ids(const std::string& s) {
  std::vector<int32_t> ids;
  std::stringstream ss(s);
  std::string tok;
  while (std::getline(ss, tok, ',')) {
    try {
      size_t used = 0;
      long long v = std::stoll(tok, &used);
      if (used != tok.size() || v < 0 || v > INT32_MAX) throw std::invalid_argument("range");
      ids.push_back(static_cast<int32_t>(v));
    } catch (const std::exception&) {
      fail("--prompt-ids: '" + tok + "' is not a token id (expected e.g. 3,17,42)");
    }
  }
  if (ids.empty()) fail("--prompt-ids: no token ids given");
  return ids;
}

void add_logits(CLI::App& app) {
  auto* cmd = app.add_subcommand("logits", "Logits for every position of input_ids (no KV cache)");
  auto model = std::make_shared<std::string>();
  auto input = std::make_shared<std::string>();
  auto output = std::make_shared<std::string>();
  auto threads = std::make_shared<int>(0);
  cmd->add_option("--model", *model, "Model folder (Hugging Face layout)")->required();
  cmd->add_option("--input", *input, "safetensors file with I64 input_ids [B, T]")->required();
  cmd->add_option("--output", *output, "safetensors file to write F32 logits [B, T, V]")->required();
  cmd->add_option("--threads", *threads, "Compute threads (0 = all cores)");
  cmd->callback([=] {
    m::set_kernel_threads(*threads);
    auto prompts = read_input_ids(*input);
    auto w = load_or_fail(*model);
    m::local_expert_executor ex(&w->experts);
    m::decoder d(*w, ex);
    auto logits = m::prompt_logits(d, prompts);
    if (!logits) fail(m::describe(logits.error()));
    std::vector<float> flat;
    for (auto& l : *logits) flat.insert(flat.end(), l.begin(), l.end());
    const auto b = static_cast<int64_t>(prompts.size()), t = static_cast<int64_t>(prompts[0].size());
    if (auto e = m::write_safetensors(*output, {m::tensor_out::f32("logits", {b, t, w->config.vocab_size}, flat)}))
      fail(m::describe(e));
  });
}

void add_generate(CLI::App& app) {
  auto* cmd = app.add_subcommand("generate", "Generate tokens with the KV cache");
  struct args {
    std::string model, prompt_ids, input, output;
    int max_new = 16, threads = 0;
    m::sampling_params sampling;
    bool ignore_eos = false;
  };
  auto a = std::make_shared<args>();
  cmd->add_option("--model", a->model, "Model folder (Hugging Face layout)")->required();
  auto* ids = cmd->add_option("--prompt-ids", a->prompt_ids, "One prompt as comma-separated token ids");
  auto* in = cmd->add_option("--input", a->input, "safetensors file with I64 input_ids [B, T]");
  ids->excludes(in);
  cmd->add_option("--max-new-tokens", a->max_new, "Tokens to generate per prompt")->check(CLI::Range(0, 1 << 20));
  cmd->add_option("--temperature", a->sampling.temperature, "0 = greedy")->check(CLI::Range(0.0, 100.0));
  cmd->add_option("--top-p", a->sampling.top_p, "Nucleus sampling mass")->check(CLI::Range(1e-9, 1.0));
  cmd->add_option("--top-k", a->sampling.top_k, "Sample among the k most likely (0 = all)")->check(CLI::NonNegativeNumber);
  cmd->add_option("--seed", a->sampling.seed, "Sampling seed (prompt i uses seed + i)");
  cmd->add_flag("--ignore-eos", a->ignore_eos, "Keep generating after an end-of-sequence token");
  cmd->add_option("--output", a->output, "Write I64 greedy_ids [B, T+N] and F32 greedy_step_logits [B, N, V]");
  cmd->add_option("--threads", a->threads, "Compute threads (0 = all cores)");
  cmd->callback([a] {
    if (a->prompt_ids.empty() && a->input.empty()) fail("generate: give --prompt-ids or --input");
    m::set_kernel_threads(a->threads);
    std::vector<std::vector<int32_t>> prompts =
        a->input.empty() ? std::vector<std::vector<int32_t>>{parse_ids(a->prompt_ids)} : read_input_ids(a->input);
    auto w = load_or_fail(a->model);
    m::local_expert_executor ex(&w->experts);
    m::decoder d(*w, ex);
    m::generate_options opts;
    opts.max_new_tokens = a->max_new;
    opts.sampling = a->sampling;
    opts.stop_at_eos = !a->ignore_eos;
    opts.keep_logits = !a->output.empty();
    auto g = m::generate(d, prompts, opts);
    if (!g) fail(m::describe(g.error()));
    for (size_t i = 0; i < prompts.size(); ++i) {
      std::string line = "prompt " + std::to_string(i) + ":";
      for (size_t j = prompts[i].size(); j < g->ids[i].size(); ++j) line += " " + std::to_string(g->ids[i][j]);
      line += g->stopped_at_eos[i] ? "  (stop: eos)" : "  (stop: length)";
      std::printf("%s\n", line.c_str());
    }
    if (a->output.empty()) return;
    // Rectangular output: a sequence that stopped early is padded with its EOS id and zero logits.
    const auto vocab = w->config.vocab_size;
    const auto b = static_cast<int64_t>(prompts.size());
    size_t max_t = 0;
    for (auto& p : prompts) max_t = std::max(max_t, p.size());
    for (auto& p : prompts)
      if (p.size() != max_t) fail("--output needs prompts of equal length");
    std::vector<int64_t> out_ids;
    std::vector<float> out_logits;
    for (size_t i = 0; i < prompts.size(); ++i) {
      auto ids_i = g->ids[i];
      const int32_t pad = ids_i.back();
      ids_i.resize(max_t + static_cast<size_t>(a->max_new), pad);
      out_ids.insert(out_ids.end(), ids_i.begin(), ids_i.end());
      auto lg = g->step_logits[i];
      lg.resize(static_cast<size_t>(a->max_new * vocab), 0.0f);
      out_logits.insert(out_logits.end(), lg.begin(), lg.end());
    }
    const auto t = static_cast<int64_t>(max_t);
    if (auto e = m::write_safetensors(a->output, {m::tensor_out::i64("greedy_ids", {b, t + a->max_new}, out_ids),
                                                   m::tensor_out::f32("greedy_step_logits", {b, a->max_new, vocab}, out_logits)}))
      fail(m::describe(e));
  });
}

void add_make_model(CLI::App& app) {
  auto* cmd = app.add_subcommand("make-model", "Write a random-weight checkpoint in the Hugging Face layout");
  auto o = std::make_shared<m::make_model_options>();
  auto family = std::make_shared<std::string>("mixtral");
  auto dtype = std::make_shared<std::string>("bf16");
  auto out = std::make_shared<std::string>();
  cmd->add_option("--family", *family, "mixtral | qwen2_moe | qwen3_moe | olmoe | deepseek_v2 | deepseek_v3")->required();
  cmd->add_option("--hidden", o->hidden, "Hidden size")->check(CLI::PositiveNumber);
  cmd->add_option("--ffn", o->ffn, "Routed expert FFN width")->check(CLI::PositiveNumber);
  cmd->add_option("--dense-ffn", o->dense_ffn, "Dense MLP width (0 = 4 × ffn)");
  cmd->add_option("--shared-ffn", o->shared_ffn, "Shared expert width (Qwen2-MoE; -1 = 4 × ffn)");
  cmd->add_option("--experts", o->experts, "Routed experts per layer")->check(CLI::PositiveNumber);
  cmd->add_option("--top-k", o->top_k, "Experts per token")->check(CLI::PositiveNumber);
  cmd->add_option("--layers", o->layers, "Decoder layers")->check(CLI::PositiveNumber);
  cmd->add_option("--heads", o->heads, "Attention heads (0 = hidden / 64)");
  cmd->add_option("--kv-heads", o->kv_heads, "Key/value heads (0 = heads / 4)");
  cmd->add_option("--vocab", o->vocab, "Vocabulary size")->check(CLI::PositiveNumber);
  cmd->add_option("--dtype", *dtype, "bf16 | f32 | fp8 (DeepSeek: e4m3 with 128x128 block scales)")
      ->check(CLI::IsMember({"bf16", "f32", "fp8"}));
  cmd->add_option("--groups", o->groups, "DeepSeek: expert groups (n_group)");
  cmd->add_option("--topk-groups", o->topk_groups, "DeepSeek: groups kept per token (topk_group)");
  cmd->add_option("--first-dense", o->first_dense, "DeepSeek: dense layers before the MoE ones (-1 = 1)");
  cmd->add_option("--shared-experts", o->shared_experts, "DeepSeek: shared experts (-1 = V3 1, V2 2)");
  cmd->add_option("--q-lora-rank", o->q_lora_rank, "DeepSeek: q LoRA rank (0 = none, -1 = V3 hidden/4, V2 none)");
  cmd->add_option("--kv-lora-rank", o->kv_lora_rank, "DeepSeek: kv LoRA rank (0 = max(16, hidden/8))");
  cmd->add_option("--seed", o->seed, "Weight seed");
  cmd->add_option("--hot-experts", o->hot_experts, "DeepSeek-V3: skew the gate towards these experts of every layer (e.g. 0,4)")
      ->delimiter(',');
  cmd->add_option("--hot-bias", o->hot_bias, "DeepSeek-V3: the score-correction bias those experts get (e.g. 1.0)");
  cmd->add_option("--out", *out, "Output folder")->required();
  cmd->callback([=] {
    auto f = m::family_from_name(*family);
    if (!f) fail("--family: unknown family '" + *family + "' (mixtral, qwen2_moe, qwen3_moe, olmoe, deepseek_v2, deepseek_v3)");
    o->family = *f;
    for (int e : o->hot_experts)
      if (e < 0 || e >= o->experts) fail("--hot-experts: expert " + std::to_string(e) + " is not in 0.." + std::to_string(o->experts - 1));
    if (!o->hot_experts.empty() && *f != m::family_id::deepseek_v3)
      fail("--hot-experts needs a gate with a score-correction bias (--family deepseek_v3)");
    o->weight_dtype = *dtype == "f32" ? m::dtype::f32 : *dtype == "fp8" ? m::dtype::f8_e4m3 : m::dtype::bf16;
    progress_printer progress("writing weights");
    o->progress = std::ref(progress);
    if (auto e = m::make_model(*out, *o)) fail(m::describe(e));
    std::printf("wrote %s\n", out->c_str());
  });
}

std::string human(double n) {
  char buf[32];
  if (n >= 1e9) std::snprintf(buf, sizeof buf, "%.2f B", n / 1e9);
  else if (n >= 1e6) std::snprintf(buf, sizeof buf, "%.2f M", n / 1e6);
  else std::snprintf(buf, sizeof buf, "%.1f K", n / 1e3);
  return buf;
}

void add_inspect(CLI::App& app) {
  auto* cmd = app.add_subcommand("inspect", "Describe a model folder: family, sizes, parameters, bytes per token");
  auto dir = std::make_shared<std::string>();
  cmd->add_option("dir", *dir, "Model folder")->required();
  cmd->callback([=] {
    auto cfg = m::load_config(*dir);
    if (!cfg) fail(m::describe(cfg.error()));
    auto ckpt = m::checkpoint::open(*dir);
    if (!ckpt) fail(m::describe(ckpt.error()));
    const auto& c = *cfg;
    int64_t total = 0, expert_params = 0;
    size_t expert_bytes = 0;
    for (auto& n : ckpt->names()) {
      const auto* t = ckpt->find(n);
      total += t->numel();
      if (n.find(".experts.") != std::string::npos) {
        expert_params += t->numel();
        expert_bytes += t->nbytes;
      }
    }
    const int moe_layers = c.num_moe_layers();
    const int64_t per_expert = moe_layers ? expert_params / (moe_layers * c.gating.num_experts) : 0;
    const int64_t active = total - expert_params + static_cast<int64_t>(moe_layers) * c.gating.top_k * per_expert;
    const double bytes_per_param = total ? static_cast<double>(ckpt->total_bytes()) / static_cast<double>(total) : 0;
    auto cache = m::cache_bytes_per_token(c);
    std::printf("model            %s\n", dir->c_str());
    std::printf("family           %s (%s)\n", c.family_name(), c.architecture.c_str());
    std::printf("layers           %d (%d with routed experts)\n", c.num_layers, moe_layers);
    std::printf("hidden           %lld, vocab %lld\n", static_cast<long long>(c.hidden_size), static_cast<long long>(c.vocab_size));
    std::printf("attention        %s, %d heads, %d kv heads, head dim %lld\n",
                c.attention == m::attention_kind::mla ? "MLA" : "GQA", c.num_heads, c.num_kv_heads,
                static_cast<long long>(c.q_head_dim()));
    std::printf("experts          %d routed, top-%d, FFN %lld%s\n", c.gating.num_experts, c.gating.top_k,
                static_cast<long long>(c.moe_intermediate_size),
                c.shared_expert_intermediate_size ? (", shared FFN " + std::to_string(c.shared_expert_intermediate_size)).c_str() : "");
    std::printf("parameters       %s total, %s active per token\n", human(static_cast<double>(total)).c_str(),
                human(static_cast<double>(active)).c_str());
    std::printf("weights          %.3f GB (%.3f GB in routed experts, %.2f bytes/param)\n",
                static_cast<double>(ckpt->total_bytes()) / 1e9, static_cast<double>(expert_bytes) / 1e9, bytes_per_param);
    std::printf("bytes per token  %.3f MB of weights read (active parameters at the checkpoint's precision)\n",
                static_cast<double>(active) * bytes_per_param / 1e6);
    std::printf("KV cache         %lld bytes per token per layer (f32)%s\n", static_cast<long long>(cache.stored),
                cache.expanded != cache.stored ? (", expanded K/V would take " + std::to_string(cache.expanded)).c_str() : "");
  });
}

}  // namespace

void add_model_commands(CLI::App& app) {
  add_logits(app);
  add_generate(app);
  add_make_model(app);
  add_inspect(app);
}

}  // namespace sy::apps
