// CHECK(cond, fmt, ...) for the C++ stress tests: on failure, prints where, the condition and the message, and
// exits with status 1 (no exceptions, so ThreadSanitizer's report of the run stays the only other output).
#pragma once

#include <cstdio>
#include <cstdlib>

#define CHECK(cond, ...)                                                            \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: check failed: %s: ", __FILE__, __LINE__, #cond); \
      std::fprintf(stderr, __VA_ARGS__);                                            \
      std::fprintf(stderr, "\n");                                                   \
      std::exit(1);                                                                 \
    }                                                                               \
  } while (0)
