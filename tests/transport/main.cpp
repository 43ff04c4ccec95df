#define CATCH_CONFIG_RUNNER
#include "test_util.hpp"

#include <catch2/catch.hpp>

#include <cstdlib>
#include <cstring>

int main(int argc, char** argv) {
  // Loopback only: nothing in these tests may wander onto other network devices.
  ::setenv("UCX_NET_DEVICES", "lo", 0);
  if (argc > 1 && std::strcmp(argv[1], "--child-server") == 0)
    return sy::transport::test::child_server_main(argc, argv);
  if (argc > 1 && std::strcmp(argv[1], "--child-throwing-callback") == 0) return sy::transport::test::throwing_callback_main();
  return Catch::Session().run(argc, argv);
}
