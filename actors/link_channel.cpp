#include "actors/link_channel.hpp"

#include "actors/observe.hpp"
#include "model/error.hpp"
#include "transport/error.hpp"

namespace sy::actors {

link_channel::link_channel(std::shared_ptr<transport::link_client> link, int64_t hidden, transport::wire_dtype dtype,
                           std::chrono::milliseconds timeout, std::string peer)
    : link_(std::move(link)), hidden_(hidden), dtype_(dtype), timeout_(timeout), peer_(std::move(peer)) {
  if (!peer_.empty())
    watch_ = std::make_unique<metrics::link_watch>(peer_, [l = link_.get()] { return link_counts_of(l->stats()); });
}

link_channel::~link_channel() {
  if (link_) link_->close();
}

caf::error link_channel::call(int layer, uint64_t epoch, std::span<const int> experts,
                              std::span<const std::vector<float>* const> inputs, std::span<std::vector<float>* const> outputs) {
  return call_async(layer, epoch, experts, inputs, outputs).get();
}

std::future<caf::error> link_channel::call_async(int layer, uint64_t epoch, std::span<const int> experts,
                                                 std::span<const std::vector<float>* const> inputs,
                                                 std::span<std::vector<float>* const> outputs) {
  auto done = std::make_shared<std::promise<caf::error>>();
  auto fut = done->get_future();
  if (experts.empty()) {
    done->set_value({});
    return fut;
  }
  transport::batch_header h;
  h.batch_id = next_batch_++;
  h.epoch = epoch;
  h.layer = static_cast<uint32_t>(layer);
  h.hidden = static_cast<uint32_t>(hidden_);
  h.dtype = dtype_;
  std::vector<float> rows;
  std::vector<size_t> sizes;
  for (size_t i = 0; i < experts.size(); ++i) {
    const auto n = inputs[i]->size() / static_cast<size_t>(hidden_);
    h.segments.push_back({static_cast<uint32_t>(experts[i]), 0, 0, static_cast<uint32_t>(n)});
    rows.insert(rows.end(), inputs[i]->begin(), inputs[i]->end());
    sizes.push_back(inputs[i]->size());
  }
  auto batch = transport::make_batch(h, rows);
  if (!batch) {
    done->set_value(batch.error());
    return fut;
  }
  transport::request req;
  req.header = std::move(batch->header);
  req.rows = std::move(batch->rows);
  std::vector<std::vector<float>*> outs(outputs.begin(), outputs.end());
  link_->send(std::move(req), timeout_,
              [done, outs = std::move(outs), sizes = std::move(sizes), total = rows.size(), peer = peer_,
               t0 = std::chrono::steady_clock::now()](caf::expected<transport::reply> r) {
                if (!peer.empty())
                  metrics::host_round_trip(peer, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
                if (!r) {
                  done->set_value(r.error());
                  return;
                }
                std::vector<float> out(total);
                if (auto e = transport::rows_to_f32(*r, out)) {
                  done->set_value(std::move(e));
                  return;
                }
                size_t off = 0;
                for (size_t i = 0; i < outs.size(); ++i) {
                  outs[i]->assign(out.begin() + static_cast<std::ptrdiff_t>(off),
                                  out.begin() + static_cast<std::ptrdiff_t>(off + sizes[i]));
                  off += sizes[i];
                }
                done->set_value({});
              });
  return fut;
}

transport::request_handler host_request_handler(std::shared_ptr<expert_host_core> core) {
  return [core](transport::request req) -> caf::expected<transport::reply> {
    const auto& h = req.header;
    const size_t hidden = h.hidden;
    std::vector<float> all(static_cast<size_t>(h.total_rows()) * hidden);
    if (auto e = transport::rows_to_f32(req, all)) return e;
    std::vector<int> experts;
    std::vector<std::vector<float>> in(h.segments.size()), out(h.segments.size());
    std::vector<const std::vector<float>*> ip;
    std::vector<std::vector<float>*> op;
    size_t off = 0;
    for (size_t i = 0; i < h.segments.size(); ++i) {
      experts.push_back(static_cast<int>(h.segments[i].expert));
      const size_t n = static_cast<size_t>(h.segments[i].rows) * hidden;
      in[i].assign(all.begin() + static_cast<std::ptrdiff_t>(off), all.begin() + static_cast<std::ptrdiff_t>(off + n));
      off += n;
      ip.push_back(&in[i]);
      op.push_back(&out[i]);
    }
    if (auto e = core->serve(static_cast<int>(h.layer), experts, ip, op)) return e;
    std::vector<float> flat;
    flat.reserve(all.size());
    for (auto& o : out) flat.insert(flat.end(), o.begin(), o.end());
    auto b = transport::make_batch(h, flat);
    if (!b) return b.error();
    transport::reply r;
    r.header = std::move(b->header);
    r.rows = std::move(b->rows);
    return r;
  };
}

}  // namespace sy::actors
