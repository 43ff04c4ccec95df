// deploy/grafana and deploy/prometheus checked against the code: every dashboard panel is complete
// (datasource, targets, title; ids unique), every variable it uses is defined, and every metric a
// dashboard or rule names exists in the catalogue (or is a recording rule). Also: a bad metrics
// setting in a config file or flag fails naming the file and the key.
#include "metrics/families.hpp"

#include <catch2/catch.hpp>
#include <nlohmann/json.hpp>

#include <cstdio>
#include <filesystem>
#include <fstream>
#include <regex>
#include <set>
#include <sstream>

using json = nlohmann::json;
namespace fs = std::filesystem;

namespace {

const fs::path source = SY_SOURCE_DIR;

std::string read(const fs::path& p) {
  std::ifstream f(p);
  REQUIRE(f);
  std::stringstream s;
  s << f.rdbuf();
  return s.str();
}

std::vector<fs::path> dashboards() {
  std::vector<fs::path> out;
  for (const auto& e : fs::directory_iterator(source / "deploy/grafana/dashboards"))
    if (e.path().extension() == ".json") out.push_back(e.path());
  std::sort(out.begin(), out.end());
  return out;
}

/// Series names the catalogue exports (histograms as _bucket, _count, _sum).
std::set<std::string> exported() {
  std::set<std::string> out;
  for (const auto& d : sy::metrics::catalog()) {
    const std::string n(d.name);
    if (d.type == sy::metrics::family_type::histogram) {
      out.insert(n + "_bucket");
      out.insert(n + "_count");
      out.insert(n + "_sum");
    } else {
      out.insert(n);
    }
  }
  return out;
}

/// Recording rule names (`record: NAME` lines).
std::set<std::string> recorded() {
  std::set<std::string> out;
  const auto text = read(source / "deploy/prometheus/switchyard.recording.yml");
  std::regex re(R"(record:\s*(\S+))");
  for (std::sregex_iterator it(text.begin(), text.end(), re), end; it != end; ++it) out.insert((*it)[1].str());
  return out;
}

/// Every metric name a PromQL text mentions: switchyard_… series and switchyard:… recorded ones.
void check_names(const std::string& text, const std::string& where) {
  static const auto have = exported();
  static const auto rules = recorded();
  std::regex re(R"(switchyard[_:][a-z0-9_:]+)");
  for (std::sregex_iterator it(text.begin(), text.end(), re), end; it != end; ++it) {
    const std::string name = (*it)[0].str();
    INFO(where << ": " << name);
    if (name.find(':') != std::string::npos) CHECK(rules.count(name) == 1);
    else CHECK(have.count(name) == 1);
  }
}

void panels_of(const json& j, std::vector<json>& out) {
  for (const auto& p : j.value("panels", json::array())) {
    out.push_back(p);
    panels_of(p, out);  // panels nested in rows
  }
}

struct run_result {
  int status = -1;
  std::string output;
};
run_result run(const std::string& cmd) {
  run_result r;
  FILE* f = ::popen((cmd + " 2>&1").c_str(), "r");
  REQUIRE(f);
  char buf[4096];
  size_t n;
  while ((n = std::fread(buf, 1, sizeof buf, f)) > 0) r.output.append(buf, n);
  const int st = ::pclose(f);
  r.status = WIFEXITED(st) ? WEXITSTATUS(st) : -1;
  return r;
}

}  // namespace

TEST_CASE("grafana: every panel has a datasource, targets with expressions and a title, and a unique id", "[metrics]") {
  const auto files = dashboards();
  REQUIRE(files.size() >= 2);
  std::set<std::string> uids;
  for (const auto& f : files) {
    INFO(f.filename());
    const auto j = json::parse(read(f));
    REQUIRE(j.is_object());
    CHECK_FALSE(j.value("title", "").empty());
    CHECK(uids.insert(j.value("uid", "")).second);
    std::set<std::string> vars{"__rate_interval", "__interval", "__range"};
    for (const auto& v : j["templating"]["list"]) vars.insert(v["name"].get<std::string>());
    std::vector<json> panels;
    panels_of(j, panels);
    REQUIRE(panels.size() >= 10);
    std::set<int64_t> ids;
    for (const auto& p : panels) {
      INFO("panel " << p.dump().substr(0, 120));
      REQUIRE(p.contains("id"));
      CHECK(ids.insert(p["id"].get<int64_t>()).second);
      CHECK_FALSE(p.value("title", "").empty());
      REQUIRE(p.contains("datasource"));
      CHECK(p["datasource"]["type"] == "prometheus");
      REQUIRE(p.contains("targets"));
      REQUIRE_FALSE(p["targets"].empty());
      std::set<std::string> refs;
      for (const auto& t : p["targets"]) {
        CHECK(refs.insert(t.value("refId", "")).second);
        const auto expr = t.value("expr", "");
        CHECK_FALSE(expr.empty());
        check_names(expr, f.filename().string());
        // Every variable used is defined.
        std::regex var(R"(\$\{?([A-Za-z_][A-Za-z0-9_]*))");
        for (std::sregex_iterator it(expr.begin(), expr.end(), var), end; it != end; ++it) CHECK(vars.count((*it)[1].str()) == 1);
      }
      const auto& g = p["gridPos"];
      CHECK(g["x"].get<int>() + g["w"].get<int>() <= 24);
    }
    for (const auto& a : j["annotations"]["list"])
      if (a.contains("expr")) check_names(a["expr"].get<std::string>(), f.filename().string() + " annotation");
  }
  // Provisioning points Grafana at the dashboards and at a Prometheus data source.
  CHECK(read(source / "deploy/grafana/provisioning/dashboards/switchyard.yml").find("type: file") != std::string::npos);
  CHECK(read(source / "deploy/grafana/provisioning/datasources/prometheus.yml").find("type: prometheus") != std::string::npos);
}

TEST_CASE("prometheus: the rules name only metrics the code exports or rules record", "[metrics]") {
  for (auto file : {"switchyard.recording.yml", "switchyard.alerts.yml"}) {
    const auto text = read(source / "deploy/prometheus" / file);
    std::regex expr_line(R"(expr:([^\n]*(\n {10,}[^\n]*)*))");
    size_t exprs = 0;
    for (std::sregex_iterator it(text.begin(), text.end(), expr_line), end; it != end; ++it, ++exprs)
      check_names((*it)[1].str(), file);
    CHECK(exprs >= 5);
  }
  // The scrape config has one job per role, with the names the dashboards select on.
  const auto cfg = read(source / "deploy/prometheus/prometheus.yml");
  for (auto job : {"switchyard-router", "switchyard-coordinator", "switchyard-expert-host"})
    CHECK(cfg.find(std::string("job_name: ") + job) != std::string::npos);
}

TEST_CASE("docs: docs/metrics.md names every metric family", "[metrics]") {
  const auto doc = read(source / "docs/metrics.md");
  for (const auto& d : sy::metrics::catalog()) {
    INFO(d.name);
    CHECK(doc.find("`" + std::string(d.name) + "`") != std::string::npos);
  }
}

TEST_CASE("config: a bad metrics setting fails naming the file and the key, or the flag", "[metrics]") {
  const fs::path dir = fs::path(SY_TEST_TMP) / "metrics_config";
  fs::create_directories(dir);
  const std::string bin = SY_BINARY;
  {
    std::ofstream(dir / "unknown.toml") << "[metrics]\nlisten = \"127.0.0.1:0\"\nper_expet = \"all\"\n";
    const auto r = run(bin + " coordinator --config " + (dir / "unknown.toml").string());
    CHECK(r.status == 1);
    CHECK(r.output.find((dir / "unknown.toml").string() + ": unknown key 'metrics.per_expet'") != std::string::npos);
  }
  {
    std::ofstream(dir / "mode.toml") << "[metrics]\nper_expert = \"top\"\n";
    const auto r = run(bin + " coordinator --config " + (dir / "mode.toml").string());
    CHECK(r.status == 1);
    CHECK(r.output.find((dir / "mode.toml").string() + ": key 'metrics.per_expert': expected all, off or top:N") !=
          std::string::npos);
  }
  {
    std::ofstream(dir / "type.toml") << "[metrics]\nlisten = 9464\n";
    const auto r = run(bin + " coordinator --config " + (dir / "type.toml").string());
    CHECK(r.status == 1);
    CHECK(r.output.find((dir / "type.toml").string() + ": key 'metrics.listen' must be a string") != std::string::npos);
  }
  {
    const auto r = run(bin + " serve --metrics-per-expert top:0 --model /nonexistent");
    CHECK(r.status == 1);
    CHECK(r.output.find("--metrics-per-expert: expected all, off or top:N") != std::string::npos);
  }
  {
    const auto r = run(bin + " expert-host --coordinator 127.0.0.1:1 --model /nonexistent --slots 4 --metrics nothing");
    CHECK(r.status == 1);
    CHECK(r.output.find("--metrics: expected HOST:PORT") != std::string::npos);
  }
}
