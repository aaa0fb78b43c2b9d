// Stress test of the torch-free ring (csrc/ring_buffer.cpp), meant to run under ThreadSanitizer:
//   g++ -std=c++17 -O1 -g -fsanitize=thread -pthread -Icsrc csrc/ring_buffer.cpp tests/cpp/ring_buffer_test.cpp
// Exits non-zero with a message on the first failed check; TSan reports races on its own.
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "check.h"
#include "ring_buffer.h"

using hetrain::ring::kClosed;
using hetrain::ring::kMetaPerField;
using hetrain::ring::kTimedOut;
using hetrain::ring::RingCore;
using hetrain::ring::RingError;
using hetrain::ring::TokenGatherer;
using hetrain::ring::TokenSlotLayout;


namespace {

// Producers write job * 1000 + k into a slot of int64 values; some are slow, some fast.
void producer_loop(RingCore* core, std::vector<int64_t>* slots, int64_t slot_len, int64_t producer, unsigned seed) {
  std::mt19937 rng(seed);
  while (true) {
    int64_t slot = -1;
    const int64_t job = core->claim(producer, 0.05, &slot);
    if (job == kClosed) return;
    if (job == kTimedOut) continue;
    const int64_t n = 1 + job % slot_len;
    for (int64_t k = 0; k < n; ++k) {
      (*slots)[slot * slot_len + k] = job * 1000 + k;
      core->note(producer, job, k, k + 1);
    }
    if (producer % 2 == 0 && rng() % 8 == 0) std::this_thread::sleep_for(std::chrono::microseconds(rng() % 300));
    const int64_t meta[kMetaPerField] = {1, n, 0, 0};
    core->commit(producer, job, meta);
  }
}

void test_stress_in_order_many_tiny_batches() {
  const int64_t num_slots = 4, slot_len = 7, producers = 4;
  RingCore core(num_slots, 1, producers, 5.0);
  std::vector<int64_t> slots(num_slots * slot_len, -1);
  std::vector<std::thread> threads;
  for (int64_t p = 0; p < producers; ++p) threads.emplace_back(producer_loop, &core, &slots, slot_len, p, 17u + p);
  std::mt19937 rng(3);
  int64_t carried = -1;  // the last batch of an epoch stays held into the next, as a Python loop variable does
  int64_t kept = -1;     // the very first batch is kept to the end: the ring goes on with one slot less
  for (int epoch = 0; epoch < 4; ++epoch) {
    const int64_t jobs = 700 + epoch;
    core.start_epoch(jobs);
    std::deque<std::pair<int64_t, int64_t>> held;  // (batch, slot): the consumer keeps some, as a prefetching trainer does
    // The third epoch is abandoned halfway: the next start_epoch must drain it.
    const int64_t stop = epoch == 2 ? jobs / 2 : jobs;
    for (int64_t j = 0; j < stop; ++j) {
      int64_t meta[kMetaPerField];
      int64_t slot = -1;
      while ((slot = core.take(j, 0.05, meta)) < 0) {
      }
      CHECK(meta[0] == 1 && meta[1] == 1 + j % slot_len, "batch %ld: meta %ld %ld", (long)j, (long)meta[0], (long)meta[1]);
      for (int64_t k = 0; k < meta[1]; ++k) {
        CHECK(slots[slot * slot_len + k] == j * 1000 + k, "batch %ld: value %ld", (long)j, (long)slots[slot * slot_len + k]);
      }
      if (kept < 0) {
        kept = slot;
        continue;
      }
      held.emplace_back(j, slot);
      if (carried >= 0) {
        core.release(carried);
        carried = -1;
      }
      // Never keep more than two (with the kept and the carried one, the ring must still have a slot to fill).
      if (held.size() > 2) {
        core.release(held.front().second);
        held.pop_front();
      }
      if (held.size() > 1 && rng() % 4 == 0) {  // out of order: the newest first
        core.release(held.back().second);
        held.pop_back();
      } else if (!held.empty() && rng() % 3 == 0) {
        core.release(held.front().second);
        held.pop_front();
      }
    }
    for (size_t h = 0; h + 1 < held.size(); ++h) core.release(held[h].second);
    if (!held.empty()) carried = held.back().second;
  }
  if (carried >= 0) core.release(carried);
  core.release(kept);
  core.close();
  for (auto& t : threads) t.join();
}

void test_failure_reaches_the_consumer_at_its_batch() {
  RingCore core(2, 1, 1, 5.0);
  std::thread producer([&] {
    while (true) {
      int64_t slot = -1;
      const int64_t job = core.claim(0, 0.05, &slot);
      if (job == kClosed) return;
      if (job == kTimedOut) continue;
      if (job == 3) {
        core.fail(0, job, "sample 42 is broken");
      } else {
        const int64_t meta[kMetaPerField] = {1, 1, 0, 0};
        core.commit(0, job, meta);
      }
    }
  });
  core.start_epoch(6);
  int64_t meta[kMetaPerField];
  for (int64_t j = 0; j < 3; ++j) {
    const int64_t slot = core.take(j, 5.0, meta);
    CHECK(slot == 0 || slot == 1, "slot %ld", (long)slot);
    core.release(slot);
  }
  bool thrown = false;
  try {
    core.take(3, 5.0, meta);
  } catch (const RingError& e) {
    thrown = std::strstr(e.what(), "sample 42 is broken") != nullptr;
  }
  CHECK(thrown, "the producer's error must reach take()");
  core.close();
  producer.join();
}

void test_stalled_producer_is_named() {
  RingCore core(2, 1, 2, 0.3);
  std::atomic<bool> stop{false};
  std::atomic<int64_t> stalled{-1};
  // Two producers; whichever claims the one batch notes a byte range and then makes no progress.
  auto producer = [&](int64_t p) {
    while (!stop) {
      int64_t slot = -1;
      const int64_t job = core.claim(p, 0.05, &slot);
      if (job < 0) continue;
      stalled = p;
      core.note(p, 99, 2048, 4096);
      while (!stop) std::this_thread::sleep_for(std::chrono::milliseconds(10));
      const int64_t meta[kMetaPerField] = {1, 1, 0, 0};
      core.commit(p, job, meta);
    }
  };
  std::thread a(producer, 0), b(producer, 1);
  core.start_epoch(1);
  std::string message;
  const auto t0 = std::chrono::steady_clock::now();
  try {
    int64_t meta[kMetaPerField];
    while (core.take(0, 0.05, meta) < 0) {
    }
  } catch (const RingError& e) {
    message = e.what();
  }
  const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  const std::string who = "producer " + std::to_string(stalled.load()) + " made no progress";
  CHECK(message.find(who) != std::string::npos, "message: %s", message.c_str());
  CHECK(message.find("batch 0, sample 99, bytes [2048, 4096)") != std::string::npos, "message: %s", message.c_str());
  CHECK(waited < 2.0, "the stall must end the wait near stall_timeout, took %f s", waited);
  stop = true;
  core.close();
  a.join();
  b.join();
}

// The seconds after `label` in a stall message ("made no progress for 1.52 s"), or -1.
double seconds_after(const std::string& message, const std::string& label) {
  const size_t at = message.find(label);
  return at == std::string::npos ? -1.0 : std::atof(message.c_str() + at + label.size());
}

// A one-batch epoch whose batch producer 0 claims, noting sample 7 (bytes [0, 8)), and then makes no progress.
// Returns what the claim returned (0: batch 0).
int64_t start_epoch_with_a_silent_producer(RingCore& core) {
  core.start_epoch(1);
  int64_t slot = -1;
  const int64_t job = core.claim(0, 1.0, &slot);
  core.note(0, 7, 0, 8);
  return job;
}

// A process stopped (Ctrl-Z, SIGSTOP) for longer than stall_timeout froze producers and consumer alike, but the
// stall clock ran on: on resume the consumer looked before the producer could note progress, and named it. A child
// process waits inside take() for a batch whose producer is silent, and is stopped by a real SIGSTOP for 1.5 s: the
// stall must be named only stall_timeout after SIGCONT, with the whole silence in the message.
void test_time_the_process_was_stopped_is_no_stall() {
  int fds[2];
  CHECK(pipe(fds) == 0, "pipe");
  std::fflush(nullptr);  // the child must not print the parent's buffered output again
  const pid_t child = fork();
  CHECK(child >= 0, "fork");
  if (child == 0) {  // no CHECK here: the parent checks what this writes to the pipe
    ::close(fds[0]);
    std::string message = "the child named no stall";
    {
      RingCore core(2, 1, 1, 0.8);
      start_epoch_with_a_silent_producer(core);
      std::thread stopper([] {  // stops the whole process while the consumer waits, as Ctrl-Z would
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
        kill(getpid(), SIGSTOP);
      });
      try {
        int64_t meta[kMetaPerField];
        core.take(0, 10.0, meta);
      } catch (const RingError& e) {
        message = e.what();
      }
      stopper.join();
    }
    const ssize_t n = write(fds[1], message.data(), message.size());
    _exit(n == static_cast<ssize_t>(message.size()) ? 0 : 1);
  }
  ::close(fds[1]);
  int status = 0;
  CHECK(waitpid(child, &status, WUNTRACED) == child && WIFSTOPPED(status), "the child did not stop (status %d)", status);
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));
  kill(child, SIGCONT);
  std::string message;
  char buf[512];
  for (ssize_t n; (n = read(fds[0], buf, sizeof buf)) > 0;) message.append(buf, static_cast<size_t>(n));
  ::close(fds[0]);
  CHECK(waitpid(child, &status, 0) == child && WIFEXITED(status) && WEXITSTATUS(status) == 0,
        "the child failed (status %d): %s", status, message.c_str());
  CHECK(message.find("producer 0 made no progress") != std::string::npos &&
            message.find("batch 0, sample 7") != std::string::npos,
        "message: %s", message.c_str());
  // Named stall_timeout after the resume, not at once; the silence reported spans the stop.
  const double counted = seconds_after(message, "the process was stopped meanwhile: only the ");
  const double silent = seconds_after(message, "made no progress for ");
  CHECK(counted >= 0.8 && silent >= 1.5 + counted, "message: %s", message.c_str());
}

// RingLoader polls take() with short timeouts. A thread holding the GIL for a second or more between polls (the
// stuck producer's own retry loop) made each poll look like a return from a stop, so a dead producer was never named.
void test_a_stall_is_named_when_the_consumer_polls_seldom() {
  RingCore core(2, 1, 1, 0.5);
  CHECK(start_epoch_with_a_silent_producer(core) == 0, "claim");
  std::string message;
  for (int poll = 0; poll < 3 && message.empty(); ++poll) {
    try {
      int64_t meta[kMetaPerField];
      CHECK(core.take(0, 0.05, meta) < 0, "batch 0 is not filled");
      std::this_thread::sleep_for(std::chrono::milliseconds(1200));  // away, as while another thread holds the GIL
    } catch (const RingError& e) {
      message = e.what();
    }
  }
  CHECK(message.find("producer 0 made no progress") != std::string::npos &&
            message.find("batch 0, sample 7") != std::string::npos,
        "a consumer polling every 1.2 s must be told of the stall; message: %s", message.c_str());
  core.close();
}

// A consumer back from a 1.5 s step found the producer silent all along, but the message said "made no progress
// for 0.5 s": the silence is counted whole.
void test_a_stall_message_reports_the_whole_silence() {
  RingCore core(2, 1, 1, 0.5);
  CHECK(start_epoch_with_a_silent_producer(core) == 0, "claim");
  std::this_thread::sleep_for(std::chrono::milliseconds(1500));  // the consumer's step
  std::string message;
  try {
    int64_t meta[kMetaPerField];
    core.take(0, 5.0, meta);
  } catch (const RingError& e) {
    message = e.what();
  }
  CHECK(seconds_after(message, "producer 0 made no progress for ") >= 1.5 &&
            message.find("stopped meanwhile") == std::string::npos,
        "message: %s", message.c_str());
  core.close();
}

void test_close_wakes_a_blocked_consumer() {
  RingCore core(2, 1, 1, 30.0);
  core.start_epoch(1);
  std::atomic<bool> woke{false};
  std::thread consumer([&] {
    try {
      int64_t meta[kMetaPerField];
      core.take(0, 20.0, meta);
    } catch (const RingError&) {
      woke = true;
    }
  });
  std::this_thread::sleep_for(std::chrono::milliseconds(50));
  const auto t0 = std::chrono::steady_clock::now();
  core.close();
  consumer.join();
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(woke && took < 1.0, "close() must end take() promptly (%f s)", took);
  int64_t slot;
  CHECK(core.claim(0, 1.0, &slot) == kClosed, "claim after close");
}

void test_drain_returns_at_its_timeout_while_a_batch_is_being_filled() {
  RingCore core(2, 1, 1, 30.0);
  core.start_epoch(4);
  int64_t slot = -1;
  const int64_t job = core.claim(0, 1.0, &slot);
  CHECK(job == 0, "claim gave %ld", (long)job);
  // The batch being filled holds up the drain, but only for the timeout asked for (the caller's Ctrl-C).
  const auto t0 = std::chrono::steady_clock::now();
  CHECK(!core.drain(0.1), "drain must not finish while batch 0 is being filled");
  const double took = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  CHECK(took < 1.0, "drain(0.1) took %f s", took);
  CHECK(core.claim(0, 0.05, &slot) == kTimedOut, "a draining ring hands out no further batch");
  std::thread finisher([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(50));
    const int64_t meta[kMetaPerField] = {1, 1, 0, 0};
    core.commit(0, job, meta);
  });
  bool drained = false;
  for (int i = 0; i < 100 && !drained; ++i) drained = core.drain(0.1);
  finisher.join();
  CHECK(drained, "drain must finish once the batch is committed");
  core.start_epoch(1);
  CHECK(core.claim(0, 1.0, &slot) == 0, "the next epoch starts at batch 0");
  core.close();
  bool thrown = false;
  try {
    core.drain(0.1);
  } catch (const RingError&) {
    thrown = true;
  }
  CHECK(thrown, "drain on a closed ring must throw");
}

std::string write_tokens(const std::vector<uint16_t>& tokens) {
  char path[] = "/tmp/hetrain_ring_test_XXXXXX";
  const int fd = mkstemp(path);
  CHECK(fd >= 0, "mkstemp");
  const ssize_t bytes = static_cast<ssize_t>(tokens.size() * sizeof(uint16_t));
  CHECK(write(fd, tokens.data(), tokens.size() * sizeof(uint16_t)) == bytes, "write");
  close(fd);
  return path;
}

void test_token_gatherer_fills_padded_batches() {
  std::vector<uint16_t> tokens(5000);
  for (size_t i = 0; i < tokens.size(); ++i) tokens[i] = static_cast<uint16_t>((i * 7919) % 60000 + 1);
  const std::string path = write_tokens(tokens);
  // Samples: windows of 1..40 tokens at scattered starts.
  std::vector<int64_t> starts, lengths;
  for (int64_t i = 0; i < 300; ++i) {
    starts.push_back((i * 131) % 4900);
    lengths.push_back(1 + (i * 37) % 40);
  }
  const int64_t max_tokens = 256, max_rows = 16;
  TokenSlotLayout layout{0, max_tokens * 8, max_tokens * 9, max_tokens * 9 + max_rows * 8, max_tokens, max_rows};
  const int64_t slot_bytes = layout.samples_offset + max_rows * 8, num_slots = 4;
  std::vector<uint8_t> memory(slot_bytes * num_slots);
  RingCore core(num_slots, 4, 3, 5.0);
  TokenGatherer gatherer(&core, memory.data(), slot_bytes, layout, path, 2, static_cast<int64_t>(tokens.size()), starts,
                         lengths, /*pad_id=*/0, /*vocab_size=*/0, /*num_threads=*/3, /*first_producer=*/0);
  for (int epoch = 0; epoch < 3; ++epoch) {
    // Batches of 1..6 consecutive samples, in an order that changes per epoch.
    std::vector<int64_t> ids, offsets{0};
    for (int64_t i = 0; i < 300; ++i) {
      ids.push_back((i * (7 + 2 * epoch)) % 300);
      const int64_t size = 1 + static_cast<int64_t>(offsets.size()) % 6;
      if (static_cast<int64_t>(ids.size()) - offsets.back() == size) offsets.push_back(static_cast<int64_t>(ids.size()));
    }
    if (offsets.back() != static_cast<int64_t>(ids.size())) offsets.push_back(static_cast<int64_t>(ids.size()));
    const int64_t batches = static_cast<int64_t>(offsets.size()) - 1;
    gatherer.start_epoch(ids.data(), static_cast<int64_t>(ids.size()), offsets.data(), batches);
    for (int64_t j = 0; j < batches; ++j) {
      int64_t meta[4 * kMetaPerField];
      int64_t slot = -1;
      while ((slot = core.take(j, 0.05, meta)) < 0) {
      }
      const int64_t rows = meta[1], cols = meta[2];
      CHECK(rows == offsets[j + 1] - offsets[j], "batch %ld rows %ld", (long)j, (long)rows);
      const uint8_t* base = memory.data() + slot * slot_bytes;
      const auto* got = reinterpret_cast<const int64_t*>(base);
      const auto* mask = reinterpret_cast<const bool*>(base + layout.mask_offset);
      const auto* sample_ids = reinterpret_cast<const int64_t*>(base + layout.samples_offset);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t s = ids[offsets[j] + r];
        CHECK(sample_ids[r] == s, "sample id");
        for (int64_t c = 0; c < cols; ++c) {
          const bool real = c < lengths[s];
          const int64_t want = real ? tokens[starts[s] + c] : 0;
          CHECK(got[r * cols + c] == want && mask[r * cols + c] == real, "batch %ld row %ld col %ld", (long)j,
                (long)r, (long)c);
        }
      }
      core.release(slot);
    }
  }
  gatherer.stop();
  unlink(path.c_str());
}

void test_truncated_token_file_is_an_error_naming_it() {
  std::vector<uint16_t> tokens(100, 5);
  const std::string path = write_tokens(tokens);
  std::vector<int64_t> starts{0, 90}, lengths{10, 20};  // sample 1 runs past the end of the file
  TokenSlotLayout layout{0, 64 * 8, 64 * 9, 64 * 9 + 8 * 8, 64, 8};
  const int64_t slot_bytes = layout.samples_offset + 64;
  std::vector<uint8_t> memory(slot_bytes * 2);
  RingCore core(2, 4, 1, 5.0);
  TokenGatherer gatherer(&core, memory.data(), slot_bytes, layout, path, 2, 200, starts, lengths, 0, 0, 1, 0);
  const int64_t ids[] = {0, 1}, offsets[] = {0, 1, 2};
  gatherer.start_epoch(ids, 2, offsets, 2);
  int64_t meta[4 * kMetaPerField];
  core.release(core.take(0, 5.0, meta));
  std::string message;
  try {
    core.take(1, 5.0, meta);
  } catch (const RingError& e) {
    message = e.what();
  }
  CHECK(message.find(path) != std::string::npos && message.find("sample 1 needs tokens [90, 110)") != std::string::npos &&
            message.find("truncated") != std::string::npos,
        "message: %s", message.c_str());
  gatherer.stop();
  unlink(path.c_str());
}

}  // namespace

int main() {
  test_stress_in_order_many_tiny_batches();
  test_failure_reaches_the_consumer_at_its_batch();
  test_stalled_producer_is_named();
  test_time_the_process_was_stopped_is_no_stall();
  test_a_stall_is_named_when_the_consumer_polls_seldom();
  test_a_stall_message_reports_the_whole_silence();
  test_close_wakes_a_blocked_consumer();
  test_drain_returns_at_its_timeout_while_a_batch_is_being_filled();
  test_token_gatherer_fills_padded_batches();
  test_truncated_token_file_is_an_error_naming_it();
  std::printf("ring_buffer_test: all checks passed\n");
  return 0;
}
