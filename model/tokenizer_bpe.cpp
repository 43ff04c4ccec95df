// The BPE model of tokenizer.json: characters → vocabulary ids, then merges applied by rank.
#include "model/tokenizer_detail.hpp"

#include <cstdio>
#include <queue>

namespace sy::model::tok {

namespace {
constexpr int64_t max_token_id = (int64_t{1} << 24) - 1;  // far above any real vocabulary

uint64_t pair_key(int32_t a, int32_t b) { return (uint64_t(uint32_t(a)) << 32) | uint32_t(b); }
}  // namespace

std::unique_ptr<bpe_model> bpe_model::parse(const json& j, const std::string& path) {
  auto m = std::make_unique<bpe_model>();
  if (const json* d = find_key(j, "dropout"); d && !(d->is_number() && d->get<double>() == 0.0))
    fail_at(model_errc::unsupported, path + ".dropout", "is not supported (BPE dropout makes encoding random)");

  const json& vocab = require_key(j, "vocab", path);
  if (!vocab.is_object()) fail_at(model_errc::bad_value, path + ".vocab", "must be an object of token → id");
  int32_t max_id = -1;
  m->vocab_.reserve(vocab.size());
  for (auto it = vocab.begin(); it != vocab.end(); ++it) {
    const json& v = it.value();
    if (!v.is_number_integer() || v.get<int64_t>() < 0 || v.get<int64_t>() > max_token_id)
      fail_at(model_errc::bad_value, path + ".vocab." + it.key(), "must be a token id in 0.." + std::to_string(max_token_id));
    const auto id = static_cast<int32_t>(v.get<int64_t>());
    m->vocab_[it.key()] = id;
    max_id = std::max(max_id, id);
  }
  m->id_to_token_.resize(static_cast<size_t>(max_id + 1));
  m->has_id_.assign(static_cast<size_t>(max_id + 1), false);
  for (const auto& [tok, id] : m->vocab_) {
    m->id_to_token_[static_cast<size_t>(id)] = tok;
    m->has_id_[static_cast<size_t>(id)] = true;
  }

  if (auto p = get_opt_string(j, "continuing_subword_prefix", path)) m->prefix_ = *p;
  if (auto s = get_opt_string(j, "end_of_word_suffix", path)) m->suffix_ = *s;
  m->byte_fallback_ = get_bool(j, "byte_fallback", path, false);
  m->fuse_unk_ = get_bool(j, "fuse_unk", path, false);
  m->ignore_merges_ = get_bool(j, "ignore_merges", path, false);
  if (auto unk = get_opt_string(j, "unk_token", path)) {
    auto id = m->token_to_id(*unk);
    if (!id) fail_at(model_errc::bad_value, path + ".unk_token", quote(*unk) + " is not in the vocabulary");
    m->unk_id_ = *id;
  }
  for (int b = 0; b < 256; ++b) {
    char name[8];
    std::snprintf(name, sizeof name, "<0x%02X>", b);
    m->byte_ids_[b] = m->token_to_id(name).value_or(-1);
  }

  if (const json* merges = find_key(j, "merges")) {
    if (!merges->is_array()) fail_at(model_errc::bad_value, path + ".merges", "must be a list");
    m->merges_.reserve(merges->size());
    for (size_t r = 0; r < merges->size(); ++r) {
      const json& e = (*merges)[r];
      const std::string where = path + ".merges[" + std::to_string(r) + "]";
      std::string a, b;
      if (e.is_string()) {
        const auto s = e.get<std::string>();
        const auto sp = s.find(' ');
        if (sp == std::string::npos) fail_at(model_errc::bad_value, where, quote(s) + " must be two tokens separated by a space");
        a = s.substr(0, sp);
        b = s.substr(sp + 1);
      } else if (e.is_array() && e.size() == 2 && e[0].is_string() && e[1].is_string()) {
        a = e[0].get<std::string>();
        b = e[1].get<std::string>();
      } else {
        fail_at(model_errc::bad_value, where, "must be \"a b\" or [\"a\", \"b\"]");
      }
      const auto ia = m->token_to_id(a), ib = m->token_to_id(b);
      if (!ia) fail_at(model_errc::bad_value, where, "token " + quote(a) + " is not in the vocabulary");
      if (!ib) fail_at(model_errc::bad_value, where, "token " + quote(b) + " is not in the vocabulary");
      // The merged token is a + b without its first prefix-length bytes, whether or not b starts
      // with the prefix (what `tokenizers` does).
      const size_t cut = m->prefix_.size();
      if (b.size() < cut || (cut < b.size() && (static_cast<unsigned char>(b[cut]) & 0xC0) == 0x80))
        fail_at(model_errc::bad_value, where, "token " + quote(b) + " cannot lose the length of continuing_subword_prefix " + quote(m->prefix_));
      const std::string merged = a + b.substr(cut);
      const auto in = m->token_to_id(merged);
      if (!in) fail_at(model_errc::bad_value, where, "merged token " + quote(merged) + " is not in the vocabulary");
      // A pair listed twice keeps its last rank, as `tokenizers` does when it builds its map.
      m->merges_[pair_key(*ia, *ib)] = merge_info{static_cast<uint32_t>(r), *in};
    }
  }
  return m;
}

std::optional<int32_t> bpe_model::token_to_id(std::string_view token) const {
  auto it = vocab_.find(token);
  if (it == vocab_.end()) return std::nullopt;
  return it->second;
}

const std::string* bpe_model::id_to_token(int32_t id) const {
  if (id < 0 || static_cast<size_t>(id) >= id_to_token_.size() || !has_id_[static_cast<size_t>(id)]) return nullptr;
  return &id_to_token_[static_cast<size_t>(id)];
}

const bpe_model::merge_info* bpe_model::find_merge(int32_t a, int32_t b) const {
  auto it = merges_.find(pair_key(a, b));
  return it == merges_.end() ? nullptr : &it->second;
}

void bpe_model::tokenize(std::string_view word, std::vector<int32_t>& out) const {
  if (word.empty()) return;
  if (ignore_merges_)
    if (auto id = token_to_id(word)) {
      out.push_back(*id);
      return;
    }
  const bool cacheable = word.size() < cache_max_word;
  if (cacheable) {
    std::shared_lock lock(cache_mu_);
    if (auto it = cache_.find(word); it != cache_.end()) {
      out.insert(out.end(), it->second.begin(), it->second.end());
      return;
    }
  }
  std::vector<int32_t> ids;
  merge_word(word, ids);
  apply_merges(ids);
  out.insert(out.end(), ids.begin(), ids.end());
  if (cacheable) {
    std::unique_lock lock(cache_mu_);
    if (cache_.size() < cache_capacity) cache_.emplace(std::string(word), std::move(ids));
  }
}

void bpe_model::merge_word(std::string_view word, std::vector<int32_t>& out) const {
  // Pending unknown: its id; `tokenizers` only flushes it before a known character or at the end,
  // so with byte fallback the <0xXX> ids of a later character can come before it.
  int32_t pending_unk = -1;
  std::string s;
  for (size_t i = 0; i < word.size();) {
    const size_t len = std::min(utf8_len(static_cast<unsigned char>(word[i])), word.size() - i);
    const bool first = i == 0, last = i + len == word.size();
    s.assign(first ? "" : prefix_);
    s.append(word.substr(i, len));
    if (last) s.append(suffix_);
    i += len;
    if (auto id = token_to_id(s)) {
      if (pending_unk >= 0) out.push_back(pending_unk), pending_unk = -1;
      out.push_back(*id);
      continue;
    }
    if (byte_fallback_) {
      bool all = true;
      for (unsigned char c : s) all = all && byte_ids_[c] >= 0;
      if (all) {
        for (unsigned char c : s) out.push_back(byte_ids_[c]);
        continue;
      }
    }
    if (unk_id_) {
      if (pending_unk >= 0 && !fuse_unk_) out.push_back(pending_unk);
      pending_unk = *unk_id_;
    }
    // Without an unk token an unknown character is dropped, as in `tokenizers`.
  }
  if (pending_unk >= 0) out.push_back(pending_unk);
}

void bpe_model::apply_merges(std::vector<int32_t>& ids) const {
  if (ids.size() < 2 || merges_.empty()) return;
  struct symbol {
    int32_t id;
    int32_t prev, next;
    bool alive;
  };
  struct candidate {
    uint32_t rank;
    int32_t pos;
    int32_t new_id;
    // Lowest rank first, then leftmost.
    bool operator<(const candidate& o) const { return rank != o.rank ? rank > o.rank : pos > o.pos; }
  };
  const auto n = static_cast<int32_t>(ids.size());
  std::vector<symbol> sym(ids.size());
  for (int32_t i = 0; i < n; ++i) sym[static_cast<size_t>(i)] = {ids[static_cast<size_t>(i)], i - 1, i + 1 < n ? i + 1 : -1, true};
  std::priority_queue<candidate> queue;
  for (int32_t i = 0; i + 1 < n; ++i)
    if (const auto* m = find_merge(ids[static_cast<size_t>(i)], ids[static_cast<size_t>(i) + 1])) queue.push({m->rank, i, m->new_id});

  while (!queue.empty()) {
    const candidate top = queue.top();
    queue.pop();
    symbol& left = sym[static_cast<size_t>(top.pos)];
    if (!left.alive || left.next < 0) continue;
    symbol& right = sym[static_cast<size_t>(left.next)];
    // Entries go stale when a neighbour merged first: check the pair is still the one queued.
    const auto* m = find_merge(left.id, right.id);
    if (!m || m->new_id != top.new_id) continue;
    left.id = top.new_id;
    right.alive = false;
    left.next = right.next;
    if (left.next >= 0) sym[static_cast<size_t>(left.next)].prev = top.pos;
    if (left.prev >= 0)
      if (const auto* pm = find_merge(sym[static_cast<size_t>(left.prev)].id, left.id)) queue.push({pm->rank, left.prev, pm->new_id});
    if (left.next >= 0)
      if (const auto* nm = find_merge(left.id, sym[static_cast<size_t>(left.next)].id)) queue.push({nm->rank, top.pos, nm->new_id});
  }
  ids.clear();
  for (int32_t i = 0; i >= 0; i = sym[static_cast<size_t>(i)].next) ids.push_back(sym[static_cast<size_t>(i)].id);
}

}  // namespace sy::model::tok
