// Runtime switches of the CUDA paths under test (the persistent recurrence and its stacked
// kernel, the CPU recurrence, conv2d round 3): each a process-wide mode read from an
// environment variable when first asked and set by a private op (convrnn::_persistent_rnn,
// _conv2d_r3, ...) that returns the mode before the call and a launch count, so that one
// process, and one GPU session, can time and test both sides.
#pragma once

#include <c10/util/Exception.h>

#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <tuple>

namespace convrnn {

// A switch's mode from the environment when first asked: 1 (on) unless the variable says 0
// (or false/off/no), or a number up to `highest` its op takes.
inline int env_mode(const char* name, int highest) {
  const char* v = std::getenv(name);
  if (v == nullptr) return 1;
  for (const char* off : {"0", "false", "off", "no", "FALSE", "OFF", "NO", "False", "Off", "No"}) {
    if (std::strcmp(v, off) == 0) return 0;
  }
  for (int m = 1; m <= highest; ++m) {
    if (std::strcmp(v, std::to_string(m).c_str()) == 0) return m;
  }
  return 1;
}

// mode -1 asks, 0..highest sets; returns (the mode before the call, the count so far).
// more: what the modes above 1 mean ("2 (...)", "2 (...) or 3 (...)"), where highest > 1.
inline std::tuple<int64_t, int64_t> switch_op(const char* op, std::atomic<int>& mode,
                                              const std::atomic<int64_t>& count, int64_t value, int64_t highest,
                                              const char* more = "") {
  TORCH_CHECK(value >= -1 && value <= highest, "convrnn.", op, ": mode must be -1 (ask), 0 (off) or 1 (on)",
              highest > 1 ? " or " : "", highest > 1 ? more : "", ", but got ", value);
  const int before = value >= 0 ? mode.exchange(static_cast<int>(value)) : mode.load();
  return {before, count.load()};
}

}  // namespace convrnn
