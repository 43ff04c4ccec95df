// Loading tokenizer.json / tokenizer_config.json; the encode and decode pipelines; streaming decode.
#include "model/tokenizer.hpp"

#include "model/tokenizer_detail.hpp"

#include <cmath>
#include <fstream>
#include <map>
#include <sstream>

namespace sy::model {

namespace {

using tok::json;

struct added_token {
  int32_t id = 0;
  std::string content;
  bool special = false, lstrip = false, rstrip = false, single_word = false, normalized = true;
};

/// Added-token contents by bytes, for leftmost-longest matching.
class token_trie {
 public:
  void insert(std::string_view s, int32_t token) {
    int32_t node = 0;
    for (unsigned char c : s) {
      auto& next = nodes_[static_cast<size_t>(node)].next;
      auto it = next.find(c);
      if (it == next.end()) {
        nodes_.emplace_back();
        it = nodes_[static_cast<size_t>(node)].next.emplace(c, static_cast<int32_t>(nodes_.size() - 1)).first;
      }
      node = it->second;
    }
    nodes_[static_cast<size_t>(node)].token = token;
  }
  [[nodiscard]] bool empty() const { return nodes_.size() == 1; }
  /// The longest token starting at s[at]: {token, length}, or token -1.
  [[nodiscard]] std::pair<int32_t, size_t> longest_at(std::string_view s, size_t at) const {
    std::pair<int32_t, size_t> best{-1, 0};
    int32_t node = 0;
    for (size_t i = at; i < s.size(); ++i) {
      const auto& next = nodes_[static_cast<size_t>(node)].next;
      auto it = next.find(static_cast<unsigned char>(s[i]));
      if (it == next.end()) break;
      node = it->second;
      if (nodes_[static_cast<size_t>(node)].token >= 0) best = {nodes_[static_cast<size_t>(node)].token, i + 1 - at};
    }
    return best;
  }

 private:
  struct node {
    std::map<unsigned char, int32_t> next;
    int32_t token = -1;  ///< index into the added-token list
  };
  std::vector<node> nodes_{1};
};

/// A stretch of the input: text still to tokenize, or an added token already recognised.
struct segment {
  tok::nstring text;
  int32_t added = -1;  ///< index into the added-token list
};

char32_t char_before(std::string_view s, size_t end) {
  size_t start = end - 1;
  while (start > 0 && (static_cast<unsigned char>(s[start]) & 0xC0) == 0x80) --start;
  size_t len = 0;
  return tok::utf8_at(s, start, len);
}

std::string read_file(const std::filesystem::path& p, caf::error& err) {
  std::ifstream in(p, std::ios::binary);
  if (!in) {
    err = make_error(model_errc::io_error, p.string() + ": cannot be opened");
    return {};
  }
  std::ostringstream ss;
  ss << in.rdbuf();
  if (in.bad()) err = make_error(model_errc::io_error, p.string() + ": read error");
  return ss.str();
}

}  // namespace

struct tokenizer::impl {
  std::unique_ptr<const tok::normalizer> normalizer;
  std::unique_ptr<const tok::pre_tokenizer> pre_tokenizer;
  std::unique_ptr<tok::bpe_model> model;
  std::unique_ptr<const tok::post_processor> post_processor;
  std::unique_ptr<const tok::decoder_step> decoder;

  std::vector<added_token> added;
  std::unordered_map<int32_t, size_t> added_by_id;
  tok::vocab_map added_by_content;
  token_trie raw_trie;         ///< added tokens matched on the input as given
  token_trie normalized_trie;  ///< added tokens matched after normalization

  struct truncation_params {
    size_t max_length = 0;
    bool left = false;
  };
  std::optional<truncation_params> truncation;
  struct padding_params {
    std::optional<size_t> fixed;
    size_t multiple = 0;
    int32_t pad_id = 0;
    bool left = false;
  };
  std::optional<padding_params> padding;

  tokenizer_settings settings;
  std::optional<int32_t> bos, eos;
  bool config_adds_bos = false, config_adds_eos = false;
  int32_t vocab_size = 0;

  void parse_tokenizer(const json& root);
  void parse_added_tokens(const json& list);
  void parse_config(const json& root);
  caf::error split_added(const tok::nstring& s, const token_trie& trie, std::vector<segment>& out) const;
  /// Runs added-token extraction, normalization and pre-tokenization, calling f(piece, added_id)
  /// for each piece in order (added_id -1 for text the model still has to tokenize).
  template <typename F>
  caf::error each_piece(std::string_view text, F&& f) const;
  [[nodiscard]] std::optional<int32_t> lookup(std::string_view token) const;
};

// ---------------------------------------------------------------------------------------------
// Loading

void tokenizer::impl::parse_tokenizer(const json& root) {
  if (!root.is_object()) tok::fail_at(model_errc::bad_format, "(top level)", "must be a JSON object");
  const json& m = tok::require_key(root, "model", "");
  if (!m.is_object()) tok::fail_at(model_errc::bad_value, "model", "must be an object");
  // Older files leave out model.type; vocab + merges is what marks BPE then.
  std::string type = "BPE";
  if (const json* t = tok::find_key(m, "type")) {
    if (!t->is_string()) tok::fail_at(model_errc::bad_value, "model.type", "must be a string");
    type = t->get<std::string>();
  } else if (!tok::find_key(m, "merges")) {
    tok::fail_at(model_errc::missing_key, "model.type", "is missing");
  }
  if (type != "BPE") tok::fail_at(model_errc::unsupported, "model.type", tok::quote(type) + " is not supported (only BPE)");
  model = tok::bpe_model::parse(m, "model");

  const json null;
  auto member = [&](const char* key) -> const json& {
    auto it = root.find(key);
    return it == root.end() ? null : *it;
  };
  normalizer = tok::parse_normalizer(member("normalizer"), "normalizer");
  pre_tokenizer = tok::parse_pre_tokenizer(member("pre_tokenizer"), "pre_tokenizer");
  post_processor = tok::parse_post_processor(member("post_processor"), "post_processor");
  decoder = tok::parse_decoder(member("decoder"), "decoder");

  if (const json* t = tok::find_key(root, "truncation")) {
    truncation_params p;
    p.max_length = static_cast<size_t>(tok::get_int(*t, "max_length", "truncation", 0, 0, INT32_MAX));
    if (!tok::find_key(*t, "max_length")) tok::fail_at(model_errc::missing_key, "truncation.max_length", "is missing");
    const auto dir = tok::get_opt_string(*t, "direction", "truncation").value_or("Right");
    if (dir != "Right" && dir != "Left") tok::fail_at(model_errc::bad_value, "truncation.direction", tok::quote(dir) + " is not Left or Right");
    p.left = dir == "Left";
    truncation = p;
  }
  if (const json* p = tok::find_key(root, "padding")) {
    padding_params pp;
    if (const json* s = tok::find_key(*p, "strategy"); s && !(s->is_string() && s->get<std::string>() == "BatchLongest")) {
      const json* fixed = tok::find_key(*s, "Fixed");
      if (!fixed || !fixed->is_number_unsigned())
        tok::fail_at(model_errc::bad_value, "padding.strategy", "must be \"BatchLongest\" or {\"Fixed\": n}");
      pp.fixed = fixed->get<size_t>();
    }
    pp.multiple = static_cast<size_t>(tok::get_int(*p, "pad_to_multiple_of", "padding", 0, 0, INT32_MAX));
    pp.pad_id = static_cast<int32_t>(tok::get_int(*p, "pad_id", "padding", 0, 0, INT32_MAX));
    const auto dir = tok::get_opt_string(*p, "direction", "padding").value_or("Right");
    if (dir != "Right" && dir != "Left") tok::fail_at(model_errc::bad_value, "padding.direction", tok::quote(dir) + " is not Left or Right");
    pp.left = dir == "Left";
    padding = pp;
  }

  if (const json* list = tok::find_key(root, "added_tokens")) parse_added_tokens(*list);
  vocab_size = model->size();
  for (const auto& a : added) vocab_size = std::max(vocab_size, a.id + 1);
}

void tokenizer::impl::parse_added_tokens(const json& list) {
  if (!list.is_array()) tok::fail_at(model_errc::bad_value, "added_tokens", "must be a list");
  for (size_t i = 0; i < list.size(); ++i) {
    const std::string path = "added_tokens[" + std::to_string(i) + "]";
    const json& e = list[i];
    if (!e.is_object()) tok::fail_at(model_errc::bad_value, path, "must be an object");
    added_token a;
    a.id = static_cast<int32_t>(tok::get_int(e, "id", path, -1, 0, (int64_t{1} << 24) - 1));
    if (a.id < 0) tok::fail_at(model_errc::missing_key, path + ".id", "is missing");
    a.content = tok::get_string(e, "content", path);
    if (a.content.empty()) continue;  // `tokenizers` skips empty added tokens too
    a.special = tok::get_bool(e, "special", path, false);
    a.lstrip = tok::get_bool(e, "lstrip", path, false);
    a.rstrip = tok::get_bool(e, "rstrip", path, false);
    a.single_word = tok::get_bool(e, "single_word", path, false);
    a.normalized = tok::get_bool(e, "normalized", path, !a.special);
    const size_t index = added.size();
    added_by_id[a.id] = index;
    added_by_content[a.content] = a.id;
    if (a.normalized && normalizer) {
      tok::nstring n{a.content, std::vector<uint32_t>(a.content.size(), 0)};
      if (auto err = normalizer->apply(n))
        tok::fail_at(model_errc::bad_value, path + ".content", "could not be normalized: " + describe(err));
      if (!n.text.empty()) normalized_trie.insert(n.text, static_cast<int32_t>(index));
    } else if (a.normalized) {
      normalized_trie.insert(a.content, static_cast<int32_t>(index));
    } else {
      raw_trie.insert(a.content, static_cast<int32_t>(index));
    }
    added.push_back(std::move(a));
  }
}

void tokenizer::impl::parse_config(const json& root) {
  if (!root.is_object()) tok::fail_at(model_errc::bad_format, "(top level)", "must be a JSON object");
  auto token_field = [&](const char* key) -> std::optional<std::string> {
    const json* v = tok::find_key(root, key);
    if (!v) return std::nullopt;
    if (v->is_string()) return v->get<std::string>();
    if (v->is_object()) return tok::get_string(*v, "content", key);
    tok::fail_at(model_errc::bad_value, key, "must be a string, an object with \"content\", or null");
  };
  settings.bos_token = token_field("bos_token");
  settings.eos_token = token_field("eos_token");
  settings.pad_token = token_field("pad_token");
  settings.unk_token = token_field("unk_token");
  if (tok::find_key(root, "add_bos_token")) settings.add_bos_token = tok::get_bool(root, "add_bos_token", "", false);
  if (tok::find_key(root, "add_eos_token")) settings.add_eos_token = tok::get_bool(root, "add_eos_token", "", false);
  if (const json* t = tok::find_key(root, "chat_template")) {
    if (t->is_string()) {
      settings.chat_template = t->get<std::string>();
    } else if (t->is_array()) {
      for (size_t i = 0; i < t->size(); ++i) {
        const std::string path = "chat_template[" + std::to_string(i) + "]";
        if (tok::get_string((*t)[i], "name", path) == "default") settings.chat_template = tok::get_string((*t)[i], "template", path);
      }
    } else {
      tok::fail_at(model_errc::bad_value, "chat_template", "must be a string or a list of {name, template}");
    }
  }
  if (const json* n = tok::find_key(root, "model_max_length")) {
    if (!n->is_number() || n->get<double>() < 0) tok::fail_at(model_errc::bad_value, "model_max_length", "must be a non-negative number");
    // transformers writes int(1e30) for "no limit".
    if (n->get<double>() < 1e18) settings.model_max_length = static_cast<int64_t>(std::floor(n->get<double>()));
  }
}

std::optional<int32_t> tokenizer::impl::lookup(std::string_view token) const {
  if (auto it = added_by_content.find(token); it != added_by_content.end()) return it->second;
  return model->token_to_id(token);
}

namespace {

caf::expected<std::unique_ptr<tokenizer::impl>> build(std::string_view tokenizer_json, const std::string& json_name,
                                                      std::string_view config_json, const std::string& config_name,
                                                      std::string chat_template_file) {
  auto p = std::make_unique<tokenizer::impl>();
  const std::string* current = &json_name;
  try {
    const json root = json::parse(tokenizer_json);
    p->parse_tokenizer(root);
    if (!config_json.empty()) {
      current = &config_name;
      json cfg;
      try {
        cfg = json::parse(config_json);
      } catch (const json::parse_error& e) {
        return make_error(model_errc::bad_format, config_name + ": not valid JSON: " + e.what());
      }
      p->parse_config(cfg);
    }
  } catch (const tok::load_error& e) {
    std::string msg = e.message;
    if (msg.starts_with(" ")) msg.erase(0, 1);  // a key at the top level has an empty parent path
    if (msg.starts_with(".")) msg.erase(0, 1);
    return make_error(e.code, *current + ": " + msg);
  } catch (const json::parse_error& e) {
    return make_error(model_errc::bad_format, *current + ": not valid JSON: " + e.what());
  } catch (const std::exception& e) {
    // A JSON value of a shape the parser did not check for, or memory running out.
    return make_error(model_errc::bad_format, *current + ": cannot be read: " + e.what());
  }
  if (p->settings.chat_template.empty()) p->settings.chat_template = std::move(chat_template_file);
  if (p->settings.bos_token) p->bos = p->lookup(*p->settings.bos_token);
  if (p->settings.eos_token) p->eos = p->lookup(*p->settings.eos_token);
  // tokenizer_config.json's add_bos_token / add_eos_token only matter when tokenizer.json's own
  // post-processor adds no token (when it does, it already encodes the model's convention).
  const bool post_adds = p->post_processor && p->post_processor->added() > 0;
  if (!post_adds) {
    p->config_adds_bos = p->settings.add_bos_token.value_or(false);
    p->config_adds_eos = p->settings.add_eos_token.value_or(false);
    if (p->config_adds_bos && !p->bos)
      return make_error(model_errc::bad_value, config_name + ": add_bos_token is true but bos_token " +
                                                   (p->settings.bos_token ? tok::quote(*p->settings.bos_token) + " is not a token of " + json_name
                                                                          : std::string("is not set")));
    if (p->config_adds_eos && !p->eos)
      return make_error(model_errc::bad_value, config_name + ": add_eos_token is true but eos_token " +
                                                   (p->settings.eos_token ? tok::quote(*p->settings.eos_token) + " is not a token of " + json_name
                                                                          : std::string("is not set")));
  }
  return p;
}

}  // namespace

caf::expected<tokenizer> tokenizer::make(std::string_view tokenizer_json, std::string_view config_json, std::string display_name) {
  std::string config_name = "tokenizer_config.json";
  if (display_name.ends_with("tokenizer.json"))
    config_name = display_name.substr(0, display_name.size() - std::string_view("tokenizer.json").size()) + config_name;
  auto p = build(tokenizer_json, display_name, config_json, config_name, {});
  if (!p) return p.error();
  return tokenizer(std::move(*p));
}

caf::expected<tokenizer> tokenizer::load(const std::filesystem::path& path) {
  std::error_code ec;
  const bool is_dir = std::filesystem::is_directory(path, ec);
  const auto json_path = is_dir ? path / "tokenizer.json" : path;
  const auto dir = is_dir ? path : path.parent_path();
  caf::error err;
  const std::string text = read_file(json_path, err);
  if (err) return err;
  std::string config, chat_template;
  if (const auto cfg_path = dir / "tokenizer_config.json"; std::filesystem::exists(cfg_path, ec)) {
    config = read_file(cfg_path, err);
    if (err) return err;
    if (config.empty()) return make_error(model_errc::bad_format, cfg_path.string() + ": is empty");
  }
  if (const auto jinja = dir / "chat_template.jinja"; std::filesystem::exists(jinja, ec)) {
    chat_template = read_file(jinja, err);
    if (err) return err;
  }
  auto p = build(text, json_path.string(), config, (dir / "tokenizer_config.json").string(), std::move(chat_template));
  if (!p) return p.error();
  return tokenizer(std::move(*p));
}

tokenizer::tokenizer(std::unique_ptr<impl> p) : impl_(std::move(p)) {}
tokenizer::tokenizer(tokenizer&&) noexcept = default;
tokenizer& tokenizer::operator=(tokenizer&&) noexcept = default;
tokenizer::~tokenizer() = default;

// ---------------------------------------------------------------------------------------------
// Encoding

caf::error tokenizer::impl::split_added(const tok::nstring& s, const token_trie& trie, std::vector<segment>& out) const {
  if (s.text.empty()) return {};
  if (trie.empty()) {
    out.push_back({s, -1});
    return {};
  }
  const std::string_view text = s.text;
  size_t done = 0;  // end of the last recognised token (with its stripped whitespace)
  for (size_t at = 0; at < text.size();) {
    const auto [index, len] = trie.longest_at(text, at);
    if (index < 0) {
      ++at;
      continue;
    }
    const auto& a = added[static_cast<size_t>(index)];
    size_t start = at, stop = at + len;
    at = stop;  // a rejected match still consumes its bytes, as the Aho-Corasick iteration does
    if (start < done) continue;
    if (a.single_word) {
      const bool word_before = start > 0 && tok::is_word_char(char_before(text, start));
      size_t l = 0;
      const bool word_after = stop < text.size() && tok::is_word_char(tok::utf8_at(text, stop, l));
      if (word_before || word_after) continue;
    }
    if (a.lstrip)
      while (start > done && tok::is_whitespace(char_before(text, start))) {
        size_t b = start - 1;
        while (b > 0 && (static_cast<unsigned char>(text[b]) & 0xC0) == 0x80) --b;
        start = b;
      }
    if (a.rstrip)
      while (stop < text.size()) {
        size_t l = 0;
        if (!tok::is_whitespace(tok::utf8_at(text, stop, l))) break;
        stop += l;
      }
    if (done < start) out.push_back({s.slice(done, start), -1});
    out.push_back({s.slice(start, stop), index});
    done = stop;
    at = std::max(at, stop);
  }
  if (done < text.size()) out.push_back({s.slice(done, text.size()), -1});
  return {};
}

template <typename F>
caf::error tokenizer::impl::each_piece(std::string_view text, F&& f) const {
  if (!tok::utf8_valid(text)) return make_error(model_errc::invalid_argument, "tokenizer: the text is not valid UTF-8");
  if (text.size() > UINT32_MAX) return make_error(model_errc::invalid_argument, "tokenizer: the text is longer than 4 GiB");
  tok::nstring input{std::string(text), std::vector<uint32_t>(text.size())};
  for (uint32_t i = 0; i < input.orig.size(); ++i) input.orig[i] = i;

  std::vector<segment> raw;
  if (auto e = split_added(input, raw_trie, raw)) return e;
  std::vector<tok::nstring> pieces;
  for (auto& seg : raw) {
    if (seg.added >= 0) {
      f(seg.text.text, added[static_cast<size_t>(seg.added)].id);
      continue;
    }
    if (normalizer)
      if (auto e = normalizer->apply(seg.text)) return e;
    std::vector<segment> parts;
    if (auto e = split_added(seg.text, normalized_trie, parts)) return e;
    for (auto& part : parts) {
      if (part.added >= 0) {
        f(part.text.text, added[static_cast<size_t>(part.added)].id);
        continue;
      }
      pieces.clear();
      pieces.push_back(std::move(part.text));
      if (pre_tokenizer)
        if (auto e = pre_tokenizer->apply(pieces)) return e;
      for (const auto& piece : pieces) f(piece.text, -1);
    }
  }
  return {};
}

caf::expected<std::vector<std::string>> tokenizer::pre_tokenize(std::string_view text) const {
  std::vector<std::string> out;
  if (auto e = impl_->each_piece(text, [&](std::string_view piece, int32_t) { out.emplace_back(piece); })) return e;
  return out;
}

caf::expected<std::vector<int32_t>> tokenizer::encode(std::string_view text, bool add_special_tokens) const {
  const impl& p = *impl_;
  std::vector<int32_t> ids;
  auto piece = [&](std::string_view piece, int32_t added_id) {
    if (added_id >= 0)
      ids.push_back(added_id);
    else
      p.model->tokenize(piece, ids);
  };
  if (auto e = p.each_piece(text, piece)) return e;

  size_t extra = 0;
  if (add_special_tokens)
    extra = (p.post_processor ? p.post_processor->added() : 0) + size_t(p.config_adds_bos) + size_t(p.config_adds_eos);
  if (p.truncation) {
    const size_t keep = p.truncation->max_length > extra ? p.truncation->max_length - extra : 0;
    if (ids.size() > keep) {
      if (p.truncation->left)
        ids.erase(ids.begin(), ids.end() - static_cast<std::ptrdiff_t>(keep));
      else
        ids.resize(keep);
    }
  }
  if (add_special_tokens) {
    if (p.post_processor) p.post_processor->apply(ids);
    if (p.config_adds_bos) ids.insert(ids.begin(), *p.bos);
    if (p.config_adds_eos) ids.push_back(*p.eos);
  }
  if (p.padding) {
    size_t target = p.padding->fixed.value_or(ids.size());
    if (p.padding->multiple > 0 && target % p.padding->multiple != 0) target += p.padding->multiple - target % p.padding->multiple;
    if (ids.size() < target) ids.insert(p.padding->left ? ids.begin() : ids.end(), target - ids.size(), p.padding->pad_id);
  }
  return ids;
}

// ---------------------------------------------------------------------------------------------
// Decoding and lookups

std::string tokenizer::decode(std::span<const int32_t> ids, bool skip_special_tokens) const {
  const impl& p = *impl_;
  std::vector<std::string> tokens;
  tokens.reserve(ids.size());
  for (int32_t id : ids) {
    if (auto it = p.added_by_id.find(id); it != p.added_by_id.end()) {
      const auto& a = p.added[it->second];
      if (!(skip_special_tokens && a.special)) tokens.push_back(a.content);
    } else if (const std::string* t = p.model->id_to_token(id)) {
      tokens.push_back(*t);
    }
  }
  std::string out;
  if (p.decoder) {
    p.decoder->apply(tokens);
    for (const auto& t : tokens) out += t;
  } else {
    for (size_t i = 0; i < tokens.size(); ++i) out += (i ? " " : "") + tokens[i];
  }
  return out;
}

std::optional<int32_t> tokenizer::token_to_id(std::string_view token) const { return impl_->lookup(token); }

std::optional<std::string> tokenizer::id_to_token(int32_t id) const {
  if (auto it = impl_->added_by_id.find(id); it != impl_->added_by_id.end()) return impl_->added[it->second].content;
  if (const std::string* t = impl_->model->id_to_token(id)) return *t;
  return std::nullopt;
}

bool tokenizer::is_special(int32_t id) const {
  auto it = impl_->added_by_id.find(id);
  return it != impl_->added_by_id.end() && impl_->added[it->second].special;
}

int32_t tokenizer::vocab_size() const { return impl_->vocab_size; }
const tokenizer_settings& tokenizer::settings() const { return impl_->settings; }
std::optional<int32_t> tokenizer::bos_id() const { return impl_->bos; }
std::optional<int32_t> tokenizer::eos_id() const { return impl_->eos; }

// ---------------------------------------------------------------------------------------------
// Streaming

incremental_decoder::incremental_decoder(const tokenizer& tok, bool skip_special_tokens)
    : tok_(&tok), skip_special_(skip_special_tokens) {}

std::string incremental_decoder::fresh_text() const {
  // ids_ starts one emitted stretch back (or at the stream's start), so decoders that look at the
  // first token (Metaspace, Strip) see the same context in both decodes below.
  const std::span<const int32_t> all(ids_);
  const std::string before = tok_->decode(all.first(read_), skip_special_);
  std::string now = tok_->decode(all, skip_special_);
  if (now.starts_with(before)) return now.substr(before.size());
  // A decoder rewrote text already emitted in the light of later ids (ByteFallback turns a whole
  // run of byte tokens into U+FFFDs once the run stops being valid UTF-8): what is out stays out,
  // and the new ids are decoded on their own.
  return tok_->decode(all.subspan(read_), skip_special_);
}

std::string incremental_decoder::push(int32_t id) {
  ids_.push_back(id);
  std::string fresh = fresh_text();
  if (fresh.empty() || tok::ends_with_replacement_char(fresh)) return {};
  ids_.erase(ids_.begin(), ids_.begin() + static_cast<std::ptrdiff_t>(read_));
  read_ = ids_.size();
  return fresh;
}

std::string incremental_decoder::finish() {
  std::string fresh = fresh_text();
  ids_.clear();
  read_ = 0;
  return fresh;
}

}  // namespace sy::model
