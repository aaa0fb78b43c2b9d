// A ring of preallocated batch slots shared by producer threads and one consumer, and a gatherer that
// fills slots from a token file read with pread. No torch here: the ThreadSanitizer test builds it alone
// (tests/cpp/ring_buffer_test.cpp) and csrc/ring_buffer_binding.cpp gives it its torch face.
//
// Batches are jobs 0..num_jobs-1 of an epoch, handed to producers in order, each into any free slot; the
// consumer takes them in order, and a slot is refilled only after the consumer released its batch (a batch
// kept alive for long only narrows the ring).
// Every wait is a condition-variable wait with a timeout (no spinning), and the consumer's wait ends
// with an error naming the producer once one makes no progress for stall_timeout seconds. Silence before the
// process last resumed from a stop (SIGSTOP, Ctrl-Z) does not count: a heartbeat thread notices the stop.
#pragma once

#include <chrono>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include <sys/types.h>
#include <unistd.h>

namespace hetrain {
namespace ring {

using Clock = std::chrono::steady_clock;

// A producer failed (its message names the sample or file) or stalled; the ring is unusable after it.
struct RingError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// What claim() returns besides a job number.
constexpr int64_t kTimedOut = -1;  // nothing to do yet: call again
constexpr int64_t kClosed = -2;    // the ring was closed: stop

// The sample a producer notes while in its slot collate rather than reading a sample (ring.py's _IN_COLLATE).
constexpr int64_t kInCollate = -2;

// Shapes a producer records for the consumer: per field, ndim then up to 3 sizes.
constexpr int kMetaPerField = 4;

class RingCore {
 public:
  // A consumer waiting while it holds every slot is told after stall_timeout_s, or held_limit_s where shorter: with
  // stall_timeout_s=inf (no stall reported) it would otherwise wait without end.
  RingCore(int64_t num_slots, int64_t num_fields, int64_t num_producers, double stall_timeout_s,
           double held_limit_s = std::numeric_limits<double>::infinity());
  ~RingCore();  // closes, joining the heartbeat thread

  int64_t num_slots() const { return num_slots_; }
  int64_t num_producers() const { return num_producers_; }
  int64_t num_fields() const { return num_fields_; }

  // Consumer: begins an epoch of num_jobs batches. Work of an abandoned epoch is drained first (a
  // producer mid-batch finishes it; its result is discarded); slots the consumer still holds stay held.
  // `install` runs once nothing is being filled, before any job of the new epoch is handed out: the
  // place to swap what producers read.
  void start_epoch(int64_t num_jobs, const std::function<void()>& install = {});
  // Consumer: hands out no further job of the current epoch and waits up to timeout_s for every batch being
  // filled; true once none is (start_epoch then waits no more). Bounded, so a caller can stay responsive to
  // signals while a producer finishes a slow batch. Throws RingError on a stall or once closed.
  bool drain(double timeout_s);

  // Producer: the next job, once its slot is free; its slot in *slot. kTimedOut or kClosed otherwise.
  // Here and in take(), a timeout_s of inf (or any over about 31 years) waits without a deadline.
  int64_t claim(int64_t producer, double timeout_s, int64_t* slot);
  // Producer: what it is working on (sample, byte range; -1 for none, kInCollate for the slot collate), for the
  // stall message; also counts as progress.
  void note(int64_t producer, int64_t sample, int64_t byte_begin, int64_t byte_end);
  // Producer: the job's slot is filled; meta holds num_fields * kMetaPerField shape numbers.
  void commit(int64_t producer, int64_t job, const int64_t* meta);
  // Producer: the job failed; the consumer gets `message` when it reaches this job.
  void fail(int64_t producer, int64_t job, const std::string& message);

  // Consumer: the slot of `job` once filled (the slot is then held), or -1 after timeout_s.
  // Throws RingError on a failed job, a stalled producer, or a slot held too long.
  int64_t take(int64_t job, double timeout_s, int64_t* meta_out);
  // Consumer: the held slot may be refilled.
  void release(int64_t slot);

  // Wakes every waiter; claim() then returns kClosed and take() throws. Joins the heartbeat thread.
  void close();
  bool closed() const;

 private:
  enum class State { kFree, kFilling, kReady, kHeld, kFailed };
  struct Slot {
    State state = State::kFree;
    int64_t job = -1;
    int64_t epoch = -1;  // epoch of the job it holds
    Clock::time_point since;
    std::string error;
  };
  // Written by its producer without the lock (note() runs per sample), read by the stall check.
  struct Producer {
    std::atomic<bool> busy{false};
    std::atomic<int64_t> job{-1}, sample{-1}, byte_begin{-1}, byte_end{-1};
    std::atomic<int64_t> last_seen_ns{0};
  };
  static int64_t now_ns() { return Clock::now().time_since_epoch() / std::chrono::nanoseconds(1); }
  bool wait_draining_locked(std::unique_lock<std::mutex>& lk, Clock::time_point deadline);

  // Consumer side (under mu_): throws on a stalled producer or on every slot held too long.
  void check_stalls_locked(Clock::time_point now, bool consumer_waits = true) const;
  // The heartbeat's thread and wake-up, on the heap: a process forked after it started copies a handle naming a
  // thread it does not have, and a condition variable recording the parent's waiter. Joined or destroyed there,
  // they hang or abort (or join an unrelated thread that reused the stack), so a child leaks them and starts its own.
  struct Heartbeat {
    std::thread thread;
    std::condition_variable wake;  // closing
    pid_t pid = 0;                 // the process whose thread it is
  };
  // The heartbeat thread: ticks every kHeartbeat until closed; a tick far later than that saw the process stopped.
  void heartbeat(Heartbeat* beat);
  // Whether this process's heartbeat runs (none before the first start_epoch, nor in a child forked after it).
  bool beating_here_locked() const { return heartbeat_ && heartbeat_->pid == ::getpid(); }

  const int64_t num_slots_, num_fields_;
  const std::chrono::duration<double> stall_timeout_;
  const std::chrono::duration<double> held_timeout_;  // the shorter of stall_timeout_s and held_limit_s
  mutable std::mutex mu_;
  std::condition_variable producers_cv_;  // a slot became free, an epoch started, or closing
  std::condition_variable consumer_cv_;   // a slot became ready or failed, or closing
  std::vector<Slot> slots_;
  std::vector<int64_t> meta_;  // num_slots * num_fields * kMetaPerField
  std::unique_ptr<Producer[]> producers_;
  const int64_t num_producers_;
  int64_t epoch_ = 0, num_jobs_ = 0, next_job_ = 0;
  int64_t cursor_ = 0;             // where the search for a free slot starts (round robin)
  std::vector<int64_t> job_slot_;  // slot of claimed job j at j % num_slots
  bool closed_ = false;
  // Started by the first start_epoch in each process, joined by close(). It needs neither the GIL nor the
  // consumer, so a consumer that polls seldom still sees stalls.
  std::unique_ptr<Heartbeat> heartbeat_;
  // The heartbeat's last tick, and when it last found the process resumed from a stop: silence before that is
  // time producers could not use, and does not count.
  Clock::time_point beat_, resumed_;
};

// A token file read with pread: <prefix>.bin with `itemsize`-byte little-endian tokens. Not mapped: a
// mapped file truncated while in use raises SIGBUS on the next read, which kills the process; pread
// returns short instead, and the reader names the file and byte range. The page cache serves both alike.
class TokenReader {
 public:
  TokenReader(const std::string& path, int64_t itemsize, int64_t num_tokens);
  ~TokenReader();
  TokenReader(const TokenReader&) = delete;
  TokenReader& operator=(const TokenReader&) = delete;

  // Copies tokens [begin, begin + n) as int64 into out; throws RingError naming the file and byte range
  // when the range lies beyond the file (truncated, before or during the run) or a token is >= vocab_size
  // (when > 0). Thread-safe; each thread reuses one scratch buffer, grown to its longest sample.
  void gather(int64_t sample, int64_t begin, int64_t n, int64_t vocab_size, int64_t* out) const;
  const std::string& path() const { return path_; }
  int64_t itemsize() const { return itemsize_; }
  // Closes the file (gather then fails); only once no thread gathers.
  void close();

 private:
  std::string path_;
  int64_t itemsize_ = 2, num_tokens_ = 0;
  int fd_ = -1;
};

// Where a token batch lives inside one slot (byte offsets from the slot's start).
struct TokenSlotLayout {
  int64_t ids_offset, mask_offset, lengths_offset, samples_offset;
  int64_t max_tokens, max_rows;
};

// Worker threads that fill slots with padded token batches: input_ids (rows, cols) int64, attention_mask
// (rows, cols) bool, lengths (rows,) int64 and sample ids (rows,) int64, from a table of samples
// (start token, length) and, per epoch, the batches as lists of sample ids.
class TokenGatherer {
 public:
  TokenGatherer(RingCore* core, uint8_t* slots, int64_t slot_bytes, TokenSlotLayout layout, const std::string& path,
                int64_t itemsize, int64_t num_tokens, std::vector<int64_t> starts, std::vector<int64_t> lengths,
                int64_t pad_id, int64_t vocab_size, int64_t num_threads, int64_t first_producer);
  ~TokenGatherer();  // closes the core and joins the threads

  // Installs the epoch's batches (flat sample ids, offsets of num_batches + 1) and starts the core's epoch.
  void start_epoch(const int64_t* sample_ids, int64_t num_ids, const int64_t* batch_offsets, int64_t num_batches);
  // Closes the core, joins the threads and closes the token file (a closed loader kept referenced held its
  // descriptor, and a deleted corpus its disk space). Safe to call more than once, from any thread.
  void stop();

 private:
  void run(int64_t producer);
  void fill(int64_t producer, int64_t job, int64_t slot);

  RingCore* core_;
  uint8_t* slots_;
  const int64_t slot_bytes_;
  const TokenSlotLayout layout_;
  TokenReader file_;
  const std::vector<int64_t> starts_, lengths_;
  const int64_t pad_id_, vocab_size_, first_producer_;
  // The epoch plan; written only in start_epoch while no slot is being filled (RingCore drains first).
  std::vector<int64_t> ids_, offsets_;
  std::vector<std::thread> threads_;
  std::mutex stop_mu_;  // one stop() joins the threads at a time
};

}  // namespace ring
}  // namespace hetrain
