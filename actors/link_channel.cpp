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

void link_channel::abandon() { link_->close(); }

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
  std::vector<size_t> sizes;
  for (size_t i = 0; i < experts.size(); ++i) {
    if (inputs[i]->size() % static_cast<size_t>(hidden_) != 0) {
      done->set_value(transport::make_error(transport::wire_errc::length_mismatch,
                                            "link channel: expert " + std::to_string(experts[i]) + "'s input holds " +
                                                std::to_string(inputs[i]->size()) + " values, not rows of " +
                                                std::to_string(hidden_)));
      return fut;
    }
    const auto n = inputs[i]->size() / static_cast<size_t>(hidden_);
    h.segments.push_back({static_cast<uint32_t>(experts[i]), 0, 0, static_cast<uint32_t>(n)});
    sizes.push_back(inputs[i]->size());
  }
  auto batch = transport::make_batch(std::move(h));
  if (!batch) {
    done->set_value(batch.error());
    return fut;
  }
  // Each expert's rows go straight into their segment (converted to the wire dtype): no
  // concatenated copy.
  for (size_t i = 0; i < experts.size(); ++i)
    transport::rows_from_f32(*inputs[i], batch->header.dtype, batch->segment_rows(i).data());
  transport::request req;
  req.header = std::move(batch->header);
  req.rows = std::move(batch->rows);
  std::vector<std::vector<float>*> outs(outputs.begin(), outputs.end());
  link_->send(std::move(req), timeout_,
              [done, outs = std::move(outs), sizes = std::move(sizes), hidden = hidden_, peer = peer_,
               t0 = std::chrono::steady_clock::now()](caf::expected<transport::reply> r) {
                if (!peer.empty())
                  metrics::host_round_trip(peer, std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
                if (!r) {
                  done->set_value(r.error());
                  return;
                }
                // The link checked that the reply answers the request (same segments and rows);
                // each segment is converted straight into its expert's output.
                if (auto e = transport::check_rows(r->header, r->rows.size())) {
                  done->set_value(std::move(e));
                  return;
                }
                if (r->header.segments.size() != outs.size() || r->header.hidden != static_cast<uint32_t>(hidden)) {
                  done->set_value(transport::make_error(transport::wire_errc::length_mismatch,
                                                        "link channel: the reply has " + std::to_string(r->header.segments.size()) +
                                                            " segments of hidden " + std::to_string(r->header.hidden) + " for " +
                                                            std::to_string(outs.size()) + " experts of hidden " +
                                                            std::to_string(hidden)));
                  return;
                }
                for (size_t i = 0; i < outs.size(); ++i) {
                  const size_t n = static_cast<size_t>(r->header.segments[i].rows) * static_cast<size_t>(hidden);
                  if (n != sizes[i]) {
                    done->set_value(transport::make_error(transport::wire_errc::length_mismatch,
                                                          "link channel: reply segment " + std::to_string(i) + " holds " +
                                                              std::to_string(n) + " values, the request " +
                                                              std::to_string(sizes[i])));
                    return;
                  }
                  outs[i]->resize(n);
                  transport::rows_to_f32(r->segment_rows(i).data(), r->header.dtype, *outs[i]);
                }
                done->set_value({});
              });
  return fut;
}

transport::request_handler host_request_handler(std::shared_ptr<expert_host_core> core) {
  return [core](transport::request req) -> caf::expected<transport::reply> {
    const auto& h = req.header;
    const size_t hidden = h.hidden;
    if (auto e = transport::check_rows(h, req.rows.size())) return e;
    // Each segment's rows are converted straight into its expert's input (the link validated the
    // frame: the segments lie inside the rows), and each output straight into the reply's segment.
    std::vector<int> experts;
    std::vector<std::vector<float>> in(h.segments.size()), out(h.segments.size());
    std::vector<const std::vector<float>*> ip;
    std::vector<std::vector<float>*> op;
    for (size_t i = 0; i < h.segments.size(); ++i) {
      experts.push_back(static_cast<int>(h.segments[i].expert));
      in[i].resize(static_cast<size_t>(h.segments[i].rows) * hidden);
      transport::rows_to_f32(req.segment_rows(i).data(), h.dtype, in[i]);
      ip.push_back(&in[i]);
      op.push_back(&out[i]);
    }
    if (auto e = core->serve(static_cast<int>(h.layer), experts, ip, op)) return e;
    auto b = transport::make_batch(h);
    if (!b) return b.error();
    for (size_t i = 0; i < out.size(); ++i) {
      if (out[i].size() != in[i].size())
        return transport::make_error(transport::wire_errc::length_mismatch,
                                     "expert host: expert " + std::to_string(experts[i]) + " answered " +
                                         std::to_string(out[i].size()) + " values for " + std::to_string(in[i].size()));
      transport::rows_from_f32(out[i], b->header.dtype, b->segment_rows(i).data());
    }
    transport::reply r;
    r.header = std::move(b->header);
    r.rows = std::move(b->rows);
    return r;
  };
}

}  // namespace sy::actors
