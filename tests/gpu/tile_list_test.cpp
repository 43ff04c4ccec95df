// The fused kernels' tile lists (model/cuda/moe_gemm.hpp), on the host: no device needed.
#include "model/cuda/moe_gemm.hpp"

#include <catch2/catch.hpp>

#include <cstdint>
#include <map>
#include <random>
#include <vector>

using namespace sy::model::cuda;

namespace {

std::vector<moe_tile> list(int cluster, const std::vector<int>& ids, const std::vector<int>& rows) {
  std::vector<int> off;
  int at = 0;
  for (int r : rows) {
    off.push_back(at);
    at += r;
  }
  const size_t n = moe_tile_list(cluster, ids.data(), off.data(), rows.data(), ids.size(), nullptr);
  std::vector<moe_tile> out(n, moe_tile{-1, -1, -1, -1});
  CHECK(moe_tile_list(cluster, ids.data(), off.data(), rows.data(), ids.size(), out.data()) == n);
  return out;
}

// Every row of every expert in exactly one tile of that expert (src_row == dst_row: packed), no
// tile over moe_tile_rows rows, and no slot left unwritten.
void covers(const std::vector<moe_tile>& l, const std::vector<int>& ids, const std::vector<int>& rows) {
  std::map<int, std::vector<int>> seen;  // expert -> times each of its rows is covered
  std::map<int, int> first;
  int at = 0;
  for (size_t g = 0; g < ids.size(); ++g) {
    seen[ids[g]].assign(size_t(rows[g]), 0);
    first[ids[g]] = at;
    at += rows[g];
  }
  for (const auto& t : l) {
    REQUIRE(seen.count(t.expert) == 1);
    CHECK(t.rows >= 0);
    CHECK(t.rows <= moe_tile_rows);
    CHECK(t.src_row == t.dst_row);
    for (int r = 0; r < t.rows; ++r) {
      const int i = t.src_row + r - first[t.expert];
      REQUIRE(i >= 0);
      REQUIRE(i < int(seen[t.expert].size()));
      ++seen[t.expert][size_t(i)];
    }
  }
  for (auto& [e, v] : seen)
    for (int c : v) CHECK(c == 1);
}

}  // namespace

TEST_CASE("tile lists: one CTA a tile takes each expert's tiles in turn", "[cuda][tiles]") {
  const std::vector<int> ids = {3, 0, 7, 5}, rows = {1, 128, 129, 0};
  const auto l = list(1, ids, rows);
  REQUIRE(l.size() == 4);  // 1 + 1 + 2 + 0
  CHECK(l[0].expert == 3);
  CHECK(l[1].expert == 0);
  CHECK(l[2].expert == 7);
  CHECK(l[2].rows == 128);
  CHECK(l[3].expert == 7);
  CHECK(l[3].rows == 1);
  covers(l, ids, rows);
}

TEST_CASE("tile lists: pairs of one expert's tiles, odd last tiles paired across experts", "[cuda][tiles]") {
  // Tiles: 3 (odd), 2, 1 (odd), 1 (odd), 4, 0, 1 (odd).
  const std::vector<int> ids = {10, 11, 12, 13, 14, 15, 16}, rows = {300, 256, 5, 64, 512, 0, 128};
  const auto l = list(2, ids, rows);
  // Whole pairs 2 + 2 + 0 + 0 + 4 + 0 + 0 = 8 tiles, four odd experts: two mixed pairs.
  REQUIRE(l.size() == 12);
  covers(l, ids, rows);
  // Runs in expert order; a mixed pair right after the run of its second expert (10 and 12: after
  // 12's empty run; 13 and 16: after 16's).
  const std::vector<int> want = {10, 10, 11, 11, 10, 12, 14, 14, 14, 14, 13, 16};
  for (size_t i = 0; i < l.size(); ++i) {
    INFO("slot " << i);
    CHECK(l[i].expert == want[i]);
  }
  // The mixed pairs hold the odd experts' last tiles.
  CHECK(l[4].rows == 300 - 256);
  CHECK(l[5].rows == 5);
  CHECK(l[10].rows == 64);
  CHECK(l[11].rows == 128);
  // Whole pairs: two consecutive tiles of one expert.
  CHECK(l[1].src_row == l[0].src_row + moe_tile_rows);
}

TEST_CASE("tile lists: an odd number of odd experts ends in a pair with an empty tile", "[cuda][tiles]") {
  const std::vector<int> ids = {1, 2, 3, 4}, rows = {7, 200, 129, 256};
  // Tiles 1 (odd), 2, 2, 2: one odd expert, no partner.
  const auto l = list(2, ids, rows);
  REQUIRE(l.size() == 8);
  covers(l, ids, rows);
  CHECK(l[6].expert == 1);
  CHECK(l[6].rows == 7);
  CHECK(l[7].expert == 1);  // the empty tile belongs to the same expert: its pair shares the weights
  CHECK(l[7].rows == 0);
}

TEST_CASE("tile lists: random batches are covered, in whole or mixed pairs", "[cuda][tiles]") {
  std::mt19937 rng(5);
  for (int round = 0; round < 200; ++round) {
    const int groups = 1 + int(rng() % 40);
    std::vector<int> ids, rows;
    for (int g = 0; g < groups; ++g) {
      ids.push_back(g * 2 + int(rng() % 2));
      rows.push_back(int(rng() % 5 == 0 ? 0 : rng() % 700));
    }
    for (int cluster : {1, 2}) {
      INFO("round " << round << ", cluster " << cluster);
      const auto l = list(cluster, ids, rows);
      covers(l, ids, rows);
      int tiles = 0;
      for (int r : rows) tiles += (r + moe_tile_rows - 1) / moe_tile_rows;
      if (cluster == 1) {
        CHECK(int(l.size()) == tiles);
        continue;
      }
      REQUIRE(l.size() % 2 == 0);
      CHECK(int(l.size()) <= tiles + 1);  // at most one empty tile
      int empty = 0;
      for (size_t p = 0; p < l.size(); p += 2) {
        const auto& a = l[p];
        const auto& b = l[p + 1];
        CHECK(a.rows > 0);
        empty += b.rows == 0;
        if (a.expert == b.expert && b.rows > 0) {
          CHECK(a.rows == moe_tile_rows);  // a whole pair: a full tile, then the next of the same expert
          CHECK(b.src_row == a.src_row + moe_tile_rows);
        }
      }
      CHECK(empty == int(l.size()) - tiles);
    }
  }
}
