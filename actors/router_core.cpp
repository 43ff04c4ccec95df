#include "actors/router_core.hpp"

#include "actors/observe.hpp"
#include "model/weights.hpp"

#include <spdlog/spdlog.h>

#include <optional>

namespace sy::actors {

caf::expected<std::unique_ptr<router_core>> router_core::make(std::shared_ptr<const model::model_config> cfg,
                                                              const model::checkpoint& ckpt,
                                                              cluster_executor::connector connect,
                                                              scheduler::batcher_config batcher,
                                                              std::chrono::milliseconds replica_wait,
                                                              bool channels_overlap, int micro_batches,
                                                              int64_t micro_batch_min_rows) {
  std::unique_ptr<router_core> r(new router_core());
  r->cfg_ = std::move(cfg);
  r->replica_wait_ = replica_wait;
  model::load_options lo;
  lo.want_expert = [](int, int) { return false; };  // the experts live on the hosts
  lo.notice = [](const std::string& m) { spdlog::info("{}", m); };
  auto dense = model::load_model(*r->cfg_, ckpt, lo);
  if (!dense) return dense.error();
  r->dense_ = std::move(*dense);
  r->exec_ = std::make_shared<cluster_executor>(std::move(connect));
  r->exec_->set_shape(r->cfg_->num_layers, r->cfg_->gating.num_experts, r->cfg_->moe_layer);
  r->exec_->set_replica_wait(replica_wait);
  r->exec_->set_overlaps(channels_overlap);
  r->decoder_ = std::make_unique<model::decoder>(*r->dense_, *r->exec_);
  r->decoder_->set_micro_batches(micro_batches, micro_batch_min_rows);
  r->batcher_ = std::make_unique<scheduler::batcher>(*r->decoder_, batcher);
  r->engine_ = std::thread([raw = r.get()] { raw->run_engine(); });
  metrics::declare_router();
  metrics::expert_layout(moe_layers(*r->cfg_), r->cfg_->gating.num_experts);
  r->metrics_hook_ = std::make_unique<metrics::scrape_hook>([exec = r->exec_.get()] {
    metrics::router_epoch(exec->epoch());
    metrics::router_retries(exec->retries());
  });
  return r;
}

router_core::~router_core() { stop(); }

void router_core::run_engine() {
  std::optional<std::chrono::steady_clock::time_point> unready_since;
  while (batcher_->wait_for_work()) {
    if (!exec_->ready()) {
      const auto now = std::chrono::steady_clock::now();
      if (!unready_since) unready_since = now;
      if (now - *unready_since < replica_wait_) {
        std::this_thread::sleep_for(std::chrono::milliseconds(5));
        continue;
      }
    } else {
      unready_since.reset();
    }
    while (batcher_->step()) {
    }
  }
}

bool router_core::wait_ready(std::chrono::milliseconds timeout) const {
  const auto until = std::chrono::steady_clock::now() + timeout;
  while (!ready()) {
    if (std::chrono::steady_clock::now() > until) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
  return true;
}

void router_core::stop() {
  if (batcher_) batcher_->stop();
  if (engine_.joinable()) engine_.join();
}

}  // namespace sy::actors
