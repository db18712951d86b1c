// The progress line: what it shows, and that it only writes where and when
// it is asked to.
#include <gtest/gtest.h>

#include <cstdio>
#include <string>

#include "progress.hpp"

namespace moba::cli {
namespace {

std::string contents(std::FILE* f) {
  std::fflush(f);
  std::rewind(f);
  std::string s;
  for (int c; (c = std::fgetc(f)) != EOF;) s += static_cast<char>(c);
  return s;
}

TEST(Progress, ForcedWritesEveryStepToItsStream) {
  std::FILE* f = std::tmpfile();
  ASSERT_NE(f, nullptr);
  {
    Progress p(Progress::Mode::forced, 4, f);
    ASSERT_TRUE(p.enabled());
    p.step("moba forward: warmup 1/1");
    p.step("moba forward: repeat 1/3");
    p.step("moba forward: repeat 2/3");
    // Two of four steps done: half the bar.
    EXPECT_EQ(p.render().substr(0, 14), "[============>");
    EXPECT_NE(p.render().find("moba forward: repeat 2/3"), std::string::npos);
    p.finish();
  }
  const std::string out = contents(f);
  std::fclose(f);
  EXPECT_NE(out.find("moba forward: warmup 1/1"), std::string::npos) << out;
  EXPECT_NE(out.find("moba forward: repeat 1/3"), std::string::npos) << out;
  EXPECT_NE(out.find("s\n"), std::string::npos)
      << "a log file gets one line per update, with the elapsed time: " << out;
}

TEST(Progress, OffAndAutomaticWithoutTerminalWriteNothing) {
  for (Progress::Mode mode : {Progress::Mode::off, Progress::Mode::automatic}) {
    std::FILE* f = std::tmpfile();
    ASSERT_NE(f, nullptr);
    {
      Progress p(mode, 2, f);
      EXPECT_FALSE(p.enabled());
      p.step("dense forward: repeat 1/1");
      p.relabel("dense forward: repeat 1/1 (again)");
    }
    EXPECT_EQ(contents(f), "");
    std::fclose(f);
  }
}

}  // namespace
}  // namespace moba::cli
