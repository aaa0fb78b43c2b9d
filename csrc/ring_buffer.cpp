// The ring's synchronisation and the token-file gatherer (see ring_buffer.h). No torch here.
#include "ring_buffer.h"

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <sstream>

namespace hetrain {
namespace ring {
namespace {

// How often a waiting consumer looks for stalled producers, at most.
constexpr std::chrono::milliseconds kStallPoll{50};
// How often the ring's heartbeat thread ticks. A tick more than kStoppedGap after the last one means the process
// (or the whole machine) was stopped meanwhile: SIGSTOP, Ctrl-Z, a debugger. Producers could not run then, and on
// resume the consumer may look before they do, so silence before the resume does not count. Only a stop is
// forgiven: a consumer away for long (a slow step, a thread holding the GIL) leaves the heartbeat ticking.
constexpr std::chrono::milliseconds kHeartbeat{100};
constexpr std::chrono::seconds kStoppedGap{1};
// How long an idle gatherer thread waits for work before looking again (and proving it is alive).
constexpr double kProducerPoll = 0.2;
// Waits longer than this (or infinite) have no deadline: converting inf, or more than about 292 years, to a
// steady_clock time point overflows, and the wrapped deadline lay in the past, so such a wait returned at once.
constexpr double kForeverS = 1e9;  // about 31 years
// The longest single condition-variable wait; a wait without deadline repeats it.
constexpr std::chrono::hours kLongestWait{24};

// When a wait of timeout_s seconds from now ends: Clock::time_point::max() for none (huge, infinite or NaN).
Clock::time_point deadline_after(double timeout_s) {
  const Clock::time_point now = Clock::now();
  if (!(timeout_s < kForeverS)) return Clock::time_point::max();
  return now + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(std::max(timeout_s, 0.0)));
}

template <typename... Args>
std::string cat(const Args&... args) {
  std::ostringstream out;
  (out << ... << args);
  return out.str();
}

}  // namespace

RingCore::RingCore(int64_t num_slots, int64_t num_fields, int64_t num_producers, double stall_timeout_s,
                   double held_limit_s)
    : num_slots_(num_slots),
      num_fields_(num_fields),
      stall_timeout_(stall_timeout_s),
      held_timeout_(std::min(stall_timeout_s, held_limit_s)),
      slots_(static_cast<size_t>(std::max<int64_t>(num_slots, 0))),
      meta_(static_cast<size_t>(std::max<int64_t>(num_slots * num_fields * kMetaPerField, 0)), 0),
      producers_(new Producer[static_cast<size_t>(std::max<int64_t>(num_producers, 0))]),
      num_producers_(num_producers) {
  if (num_slots < 1 || num_fields < 1 || num_producers < 1 || !(stall_timeout_s > 0) || !(held_limit_s > 0)) {
    throw std::invalid_argument(cat("hetrain ring: need num_slots, num_fields and num_producers >= 1 and "
                                    "stall_timeout and held_limit > 0, got ",
                                    num_slots, ", ", num_fields, ", ", num_producers, ", ", stall_timeout_s, ", ",
                                    held_limit_s));
  }
  for (int64_t p = 0; p < num_producers_; ++p) producers_[p].last_seen_ns = now_ns();
  job_slot_.assign(static_cast<size_t>(num_slots), 0);
}

RingCore::~RingCore() {
  close();
  (void)heartbeat_.release();  // still set only in a forked child: the parent's, left alone (see Heartbeat)
}

void RingCore::heartbeat(Heartbeat* beat) {
  std::unique_lock<std::mutex> lk(mu_);
  while (!closed_) {
    beat->wake.wait_for(lk, kHeartbeat);
    const Clock::time_point now = Clock::now();
    if (now - beat_ > kStoppedGap) resumed_ = now;
    beat_ = now;
  }
}

void RingCore::check_stalls_locked(Clock::time_point now, bool consumer_waits) const {
  const double limit = stall_timeout_.count();
  // Silence before the process last resumed from a stop does not count. Just after one, this check may run before
  // the heartbeat's next tick: a tick overdue by kStoppedGap is such a stop, ending now. (A forked child that did not
  // start an epoch has no heartbeat, and no stop is seen there.)
  const Clock::time_point resumed = beating_here_locked() && now - beat_ > kStoppedGap ? now : resumed_;
  auto seconds = [](Clock::duration d) { return std::chrono::duration<double>(d).count(); };
  // The message reports the whole silence since `since`, and says when part of it was not counted.
  auto terms = [&](Clock::time_point since) {
    std::string s = cat(" (stall_timeout=", limit, " s");
    if (resumed > since) s += cat("; the process was stopped meanwhile: only the ", seconds(now - resumed),
                                  " s since it resumed count");
    return s + ")";
  };
  if (consumer_waits && std::all_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.state == State::kHeld; })) {
    const auto newest = std::max_element(slots_.begin(), slots_.end(),
                                         [](const Slot& a, const Slot& b) { return a.since < b.since; });
    if (now - std::max(newest->since, resumed) > held_timeout_) {
      const auto oldest = std::min_element(slots_.begin(), slots_.end(),
                                           [](const Slot& a, const Slot& b) { return a.since < b.since; });
      std::string limit = terms(newest->since);
      if (held_timeout_ < stall_timeout_) {  // not stall_timeout's doing: say which wait ended
        limit.insert(limit.size() - 1, cat("; every slot held is reported after ", held_timeout_.count(), " s"));
      }
      throw RingError(cat("hetrain ring: no free slot for ", seconds(now - newest->since), " s", limit,
                          ": the consumer still holds all ", num_slots_, " slots (the oldest holds batch ", oldest->job,
                          "; their tensors are still referenced); drop references to old batches or raise num_slots"));
    }
  }
  // The producer silent the longest is named: others may only be waiting behind it (for a shared reader
  // process, or the next batch in order), and the first one found over the limit could be one of those.
  int64_t p = 0, seen_n = producers_[0].last_seen_ns.load();
  for (int64_t q = 1; q < num_producers_; ++q) {
    const int64_t n = producers_[q].last_seen_ns.load();
    if (n < seen_n) p = q, seen_n = n;
  }
  const Clock::time_point seen{std::chrono::duration_cast<Clock::duration>(std::chrono::nanoseconds(seen_n))};
  if (now - std::max(seen, resumed) <= stall_timeout_) return;
  const double quiet = seconds(now - seen);
  const Producer& pr = producers_[p];
  if (!pr.busy.load()) {
    throw RingError(cat("hetrain ring: producer ", p, " stopped responding: idle and silent for ", quiet, " s",
                        terms(seen)));
  }
  std::string where = cat("batch ", pr.job.load());
  if (pr.sample.load() >= 0) where += cat(", sample ", pr.sample.load());
  if (pr.sample.load() == kInCollate) where += ", in the slot collate";
  if (pr.byte_begin.load() >= 0) where += cat(", bytes [", pr.byte_begin.load(), ", ", pr.byte_end.load(), ")");
  throw RingError(cat("hetrain ring: producer ", p, " made no progress for ", quiet, " s", terms(seen), " while on ",
                      where));
}

// True once no slot is being filled (or the ring closed), false at the deadline.
bool RingCore::wait_draining_locked(std::unique_lock<std::mutex>& lk, Clock::time_point deadline) {
  auto filling = [this] {
    return std::any_of(slots_.begin(), slots_.end(), [](const Slot& s) { return s.state == State::kFilling; });
  };
  while (!closed_ && filling()) {
    const auto now = Clock::now();
    if (now >= deadline) return false;
    consumer_cv_.wait_until(lk, std::min<Clock::time_point>(deadline, now + kStallPoll));
    check_stalls_locked(Clock::now(), false);
  }
  return true;
}

bool RingCore::drain(double timeout_s) {
  std::unique_lock<std::mutex> lk(mu_);
  if (closed_) throw RingError("hetrain ring: the ring is closed");
  num_jobs_ = 0;  // hand out nothing while the last epoch drains
  const bool drained = wait_draining_locked(lk, deadline_after(timeout_s));
  if (closed_) throw RingError("hetrain ring: the ring is closed");
  return drained;
}

void RingCore::start_epoch(int64_t num_jobs, const std::function<void()>& install) {
  if (num_jobs < 0) throw std::invalid_argument(cat("hetrain ring: num_jobs must be >= 0, got ", num_jobs));
  std::unique_lock<std::mutex> lk(mu_);
  if (closed_) throw RingError("hetrain ring: the ring is closed");
  if (!beating_here_locked()) {
    (void)heartbeat_.release();  // a forked child's copy of the parent's: left alone (see Heartbeat)
    heartbeat_ = std::make_unique<Heartbeat>();
    heartbeat_->pid = ::getpid();
    beat_ = Clock::now();
    Heartbeat* beat = heartbeat_.get();
    beat->thread = std::thread([this, beat] { heartbeat(beat); });
  }
  num_jobs_ = 0;  // hand out nothing while the last epoch drains
  wait_draining_locked(lk, Clock::time_point::max());
  if (closed_) throw RingError("hetrain ring: the ring is closed");
  for (Slot& s : slots_) {
    if (s.state == State::kReady || s.state == State::kFailed) {
      s.state = State::kFree;
      s.job = -1;
      s.error.clear();
    }
  }
  if (install) install();
  ++epoch_;
  next_job_ = 0;
  num_jobs_ = num_jobs;
  producers_cv_.notify_all();
}

int64_t RingCore::claim(int64_t producer, double timeout_s, int64_t* slot) {
  Producer& pr = producers_[producer];
  std::unique_lock<std::mutex> lk(mu_);
  pr.busy = false;
  pr.last_seen_ns = now_ns();
  int64_t free_slot = -1;
  auto ready = [&] {
    if (closed_) return true;
    if (next_job_ >= num_jobs_) return false;
    // Any free slot will do, so a batch the consumer keeps for long only narrows the ring.
    for (int64_t k = 0; k < num_slots_; ++k) {
      const int64_t c = (cursor_ + k) % num_slots_;
      if (slots_[c].state == State::kFree) {
        free_slot = c;
        return true;
      }
    }
    return false;
  };
  const Clock::time_point deadline = deadline_after(timeout_s);
  bool woke = ready();
  while (!woke && Clock::now() < deadline) {
    woke = producers_cv_.wait_until(lk, std::min<Clock::time_point>(deadline, Clock::now() + kLongestWait), ready);
  }
  pr.last_seen_ns = now_ns();
  if (closed_) return kClosed;
  if (!woke) return kTimedOut;
  const int64_t job = next_job_++;
  cursor_ = (free_slot + 1) % num_slots_;
  // At most num_slots jobs are claimed and not yet taken, so job % num_slots names each uniquely.
  job_slot_[job % num_slots_] = free_slot;
  Slot& s = slots_[free_slot];
  s.state = State::kFilling;
  s.job = job;
  s.epoch = epoch_;
  s.since = Clock::now();
  pr.job = job;
  pr.sample = -1;
  pr.byte_begin = -1;
  pr.byte_end = -1;
  pr.busy = true;
  *slot = free_slot;
  return job;
}

void RingCore::note(int64_t producer, int64_t sample, int64_t byte_begin, int64_t byte_end) {
  Producer& pr = producers_[producer];
  pr.sample = sample;
  pr.byte_begin = byte_begin;
  pr.byte_end = byte_end;
  pr.last_seen_ns = now_ns();
}

void RingCore::commit(int64_t producer, int64_t job, const int64_t* meta) {
  std::lock_guard<std::mutex> lk(mu_);
  const int64_t slot = job_slot_[job % num_slots_];
  Slot& s = slots_[slot];
  if (s.state == State::kFilling && s.job == job) {
    s.state = State::kReady;
    const int64_t n = num_fields_ * kMetaPerField;
    std::copy(meta, meta + n, meta_.begin() + slot * n);
  }
  producers_[producer].busy = false;
  producers_[producer].last_seen_ns = now_ns();
  consumer_cv_.notify_all();
}

void RingCore::fail(int64_t producer, int64_t job, const std::string& message) {
  std::lock_guard<std::mutex> lk(mu_);
  Slot& s = slots_[job_slot_[job % num_slots_]];
  if (s.state == State::kFilling && s.job == job) {
    s.state = State::kFailed;
    s.error = message;
  }
  producers_[producer].busy = false;
  producers_[producer].last_seen_ns = now_ns();
  consumer_cv_.notify_all();
}

int64_t RingCore::take(int64_t job, double timeout_s, int64_t* meta_out) {
  std::unique_lock<std::mutex> lk(mu_);
  if (job < 0 || job >= num_jobs_) {
    throw std::out_of_range(cat("hetrain ring: batch ", job, " is outside this epoch's ", num_jobs_, " batches"));
  }
  const Clock::time_point deadline = deadline_after(timeout_s);
  while (true) {
    if (closed_) throw RingError("hetrain ring: the ring was closed while the consumer waited");
    if (job < next_job_) {  // claimed: its slot is known
      const int64_t slot = job_slot_[job % num_slots_];
      Slot& s = slots_[slot];
      if (s.job == job && s.epoch == epoch_ && s.state == State::kReady) {
        s.state = State::kHeld;
        s.since = Clock::now();
        const int64_t n = num_fields_ * kMetaPerField;
        std::copy(meta_.begin() + slot * n, meta_.begin() + (slot + 1) * n, meta_out);
        return slot;
      }
      if (s.job == job && s.epoch == epoch_ && s.state == State::kFailed) throw RingError(s.error);
    }
    const auto now = Clock::now();
    check_stalls_locked(now);
    if (now >= deadline) return -1;
    consumer_cv_.wait_until(lk, std::min<Clock::time_point>(deadline, now + kStallPoll));
  }
}

void RingCore::release(int64_t slot) {
  std::lock_guard<std::mutex> lk(mu_);
  Slot& s = slots_[slot];
  if (s.state == State::kHeld) {
    s.state = State::kFree;
    producers_cv_.notify_all();
  }
}

void RingCore::close() {
  std::unique_ptr<Heartbeat> beat;
  {
    std::lock_guard<std::mutex> lk(mu_);
    closed_ = true;
    producers_cv_.notify_all();
    consumer_cv_.notify_all();
    if (beating_here_locked()) {  // joined by the first close() only
      heartbeat_->wake.notify_all();
      beat = std::move(heartbeat_);
    }
  }
  if (beat) beat->thread.join();  // without mu_, which the heartbeat takes to see closed_
}

bool RingCore::closed() const {
  std::lock_guard<std::mutex> lk(mu_);
  return closed_;
}

// ---------------------------------------------------------------------------------------------------

TokenReader::TokenReader(const std::string& path, int64_t itemsize, int64_t num_tokens)
    : path_(path), itemsize_(itemsize), num_tokens_(num_tokens) {
  if (itemsize != 2 && itemsize != 4) throw RingError(cat("hetrain ring: ", path, ": itemsize must be 2 or 4"));
  // Bounded so that no byte offset below wraps.
  if (num_tokens < 0 || num_tokens > INT64_MAX / itemsize) {
    throw RingError(cat("hetrain ring: ", path, ": the index promises ", num_tokens, " tokens, outside [0, ",
                        INT64_MAX / itemsize, "]: corrupt index"));
  }
  fd_ = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd_ < 0) throw RingError(cat("hetrain ring: cannot open token file ", path, ": ", std::strerror(errno)));
}

TokenReader::~TokenReader() { close(); }

void TokenReader::close() {
  if (fd_ >= 0) ::close(fd_);
  fd_ = -1;
}

namespace {
template <typename T>
int64_t copy_tokens(const uint8_t* src, int64_t n, int64_t vocab_size, int64_t* out) {
  const T* tokens = reinterpret_cast<const T*>(src);  // the file is little-endian, as is every host we build for
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<int64_t>(tokens[i]);
  if (vocab_size > 0) {
    for (int64_t i = 0; i < n; ++i) {
      if (out[i] >= vocab_size) return i;
    }
  }
  return -1;
}
}  // namespace

void TokenReader::gather(int64_t sample, int64_t begin, int64_t n, int64_t vocab_size, int64_t* out) const {
  // Written so nothing wraps: begin + n of a corrupt window may lie past int64's end.
  if (begin < 0 || n < 0 || n > num_tokens_ - begin) {
    throw RingError(cat("hetrain ring: token file ", path_, ": sample ", sample, " needs ", n, " tokens from token ",
                        begin, ", outside the ", num_tokens_, " tokens its index promises: corrupt index"));
  }
  // Within num_tokens_, which is at most INT64_MAX / itemsize_: these byte counts cannot wrap.
  const int64_t first = begin * itemsize_, bytes = n * itemsize_;
  int64_t done = 0;
  thread_local std::vector<uint8_t> scratch;  // grows to the longest sample once: no allocation per batch after
  if (static_cast<int64_t>(scratch.size()) < bytes) scratch.resize(static_cast<size_t>(bytes));
  while (done < bytes) {
    const ssize_t got = ::pread(fd_, scratch.data() + done, static_cast<size_t>(bytes - done), first + done);
    if (got < 0 && errno == EINTR) continue;
    if (got < 0) {
      throw RingError(cat("hetrain ring: token file ", path_, ": reading sample ", sample, " at byte ", first + done,
                          " failed: ", std::strerror(errno)));
    }
    if (got == 0) break;  // end of file: truncated
    done += got;
  }
  if (done < bytes) {
    struct stat st {};
    const int64_t size = ::fstat(fd_, &st) == 0 ? static_cast<int64_t>(st.st_size) : -1;
    throw RingError(cat("hetrain ring: token file ", path_, ": sample ", sample, " needs tokens [", begin, ", ",
                        begin + n, ") = bytes [", first, ", ", first + bytes, "), but the file holds ", size / itemsize_,
                        " tokens (", size, " bytes) of the ", num_tokens_, " its index promises: truncated or corrupt"));
  }
  const int64_t bad = itemsize_ == 2 ? copy_tokens<uint16_t>(scratch.data(), n, vocab_size, out)
                                     : copy_tokens<uint32_t>(scratch.data(), n, vocab_size, out);
  if (bad >= 0) {
    throw RingError(cat("hetrain ring: token file ", path_, ": sample ", sample, " has token id ", out[bad],
                        " >= vocab_size ", vocab_size, " at byte ", (begin + bad) * itemsize_, ": corrupt file or wrong vocab"));
  }
}

// ---------------------------------------------------------------------------------------------------

TokenGatherer::TokenGatherer(RingCore* core, uint8_t* slots, int64_t slot_bytes, TokenSlotLayout layout,
                             const std::string& path, int64_t itemsize, int64_t num_tokens, std::vector<int64_t> starts,
                             std::vector<int64_t> lengths, int64_t pad_id, int64_t vocab_size, int64_t num_threads,
                             int64_t first_producer)
    : core_(core),
      slots_(slots),
      slot_bytes_(slot_bytes),
      layout_(layout),
      file_(path, itemsize, num_tokens),
      starts_(std::move(starts)),
      lengths_(std::move(lengths)),
      pad_id_(pad_id),
      vocab_size_(vocab_size),
      first_producer_(first_producer) {
  if (starts_.size() != lengths_.size()) throw std::invalid_argument("hetrain ring: starts and lengths differ in size");
  for (size_t i = 0; i < starts_.size(); ++i) {  // n <= num_tokens - start: start + n could wrap
    if (starts_[i] < 0 || lengths_[i] < 0 || lengths_[i] > num_tokens - starts_[i]) {
      throw std::invalid_argument(cat("hetrain ring: window ", i, " (start ", starts_[i], ", length ", lengths_[i],
                                      ") lies outside the token file's ", num_tokens,
                                      " tokens: the windows do not belong to this file, or its index is corrupt "
                                      "(offsets past the tokens it holds; open it with validate=True to check)"));
    }
  }
  if (core->num_fields() != 4) throw std::invalid_argument("hetrain ring: a token ring has 4 fields per slot");
  if (num_threads < 1 || first_producer < 0 || first_producer + num_threads > core->num_producers()) {
    throw std::invalid_argument(cat("hetrain ring: ", num_threads, " gather threads from producer ", first_producer,
                                    " do not fit the ring's ", core->num_producers(), " producers"));
  }
  threads_.reserve(static_cast<size_t>(num_threads));
  try {
    for (int64_t t = 0; t < num_threads; ++t) threads_.emplace_back([this, t] { run(first_producer_ + t); });
  } catch (...) {  // a thread limit: the ones started are joined, or destroying them would terminate the process
    stop();
    throw;
  }
}

TokenGatherer::~TokenGatherer() { stop(); }

void TokenGatherer::stop() {
  core_->close();
  std::lock_guard<std::mutex> lk(stop_mu_);
  for (std::thread& t : threads_) {
    if (t.joinable()) t.join();
  }
  file_.close();
}

void TokenGatherer::start_epoch(const int64_t* sample_ids, int64_t num_ids, const int64_t* batch_offsets,
                                int64_t num_batches) {
  if (batch_offsets[0] != 0 || batch_offsets[num_batches] != num_ids ||
      !std::is_sorted(batch_offsets, batch_offsets + num_batches + 1)) {
    // A decreasing offset would give a batch negative rows and let the gather read past the sample ids.
    throw std::invalid_argument("hetrain ring: batch offsets must rise from 0 to the number of sample ids");
  }
  core_->start_epoch(num_batches, [&] {
    // assign() reuses the vectors' capacity: after the first epoch this allocates nothing.
    ids_.assign(sample_ids, sample_ids + num_ids);
    offsets_.assign(batch_offsets, batch_offsets + num_batches + 1);
  });
}

void TokenGatherer::run(int64_t producer) {
  while (true) {
    int64_t slot = -1;
    const int64_t job = core_->claim(producer, kProducerPoll, &slot);
    if (job == kClosed) return;
    if (job == kTimedOut) continue;
    try {
      fill(producer, job, slot);
    } catch (const std::exception& e) {
      core_->fail(producer, job, e.what());
    }
  }
}

void TokenGatherer::fill(int64_t producer, int64_t job, int64_t slot) {
  const int64_t b0 = offsets_[job], rows = offsets_[job + 1] - b0;
  const int64_t num_samples = static_cast<int64_t>(starts_.size());
  int64_t cols = 0;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t sample = ids_[b0 + r];
    if (sample < 0 || sample >= num_samples) {
      throw RingError(cat("hetrain ring: batch ", job, " names sample ", sample, " of ", num_samples));
    }
    cols = std::max(cols, lengths_[sample]);
  }
  if (rows > layout_.max_rows || (rows > 0 && cols > layout_.max_tokens / rows)) {  // rows * cols could wrap
    throw RingError(cat("hetrain ring: batch ", job, " is ", rows, " x ", cols, " tokens but a slot holds ",
                        layout_.max_rows, " rows and ", layout_.max_tokens, " tokens; size the slots with "
                        "RingLoader(max_tokens=..., max_rows=...) (by default the batch sampler's max_tokens and "
                        "max_batch_rows) or make the sampler's batches smaller"));
  }
  uint8_t* base = slots_ + slot * slot_bytes_;
  auto* ids = reinterpret_cast<int64_t*>(base + layout_.ids_offset);
  auto* mask = reinterpret_cast<bool*>(base + layout_.mask_offset);
  auto* lens = reinterpret_cast<int64_t*>(base + layout_.lengths_offset);
  auto* samples = reinterpret_cast<int64_t*>(base + layout_.samples_offset);
  const int64_t width = file_.itemsize();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t sample = ids_[b0 + r], start = starts_[sample], n = lengths_[sample];
    core_->note(producer, sample, start * width, (start + n) * width);
    file_.gather(sample, start, n, vocab_size_, ids + r * cols);
    std::fill(ids + r * cols + n, ids + (r + 1) * cols, pad_id_);
    std::fill(mask + r * cols, mask + r * cols + n, true);
    std::fill(mask + r * cols + n, mask + (r + 1) * cols, false);
    lens[r] = n;
    samples[r] = sample;
  }
  const int64_t meta[4 * kMetaPerField] = {2, rows, cols, 0, 2, rows, cols, 0, 1, rows, 0, 0, 1, rows, 0, 0};
  core_->commit(producer, job, meta);
}

}  // namespace ring
}  // namespace hetrain
