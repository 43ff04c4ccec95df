#pragma once
/// The reference the planner is measured against: DeepSeek's EPLB (github.com/deepseek-ai/EPLB,
/// eplb.py), re-implemented from its published algorithm so the benchmark and the tests can run it
/// on the same inputs. Per layer:
///  * hierarchical (nodes > 1 and groups a multiple of nodes): expert groups are packed onto nodes
///    by group load, the same number per node; then within each node, as below;
///  * replicate: add a replica to the expert with the highest load per replica until every slot is
///    used;
///  * pack: replicas, heaviest (load / replica count) first, each onto the GPU with the least load
///    among those with a free slot (a fixed count per GPU).
/// Every replica of an expert receives the same share (1 / replicas). Planning is from scratch.
#include "scheduler/planner.hpp"

namespace sy::scheduler {

/// EPLB's plan for `p` (assumes validate(p) passed). Unlike our planner EPLB may put two replicas
/// of one expert on one GPU; such a pair is reported as one entry with the summed share.
[[nodiscard]] plan eplb_plan(const planner_problem& p);

}  // namespace sy::scheduler
