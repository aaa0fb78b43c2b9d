// torch face of the ring (csrc/ring_buffer.h): torch.classes.hetrain_C.RingBuffer.
//
// The slots live in one host tensor allocated once (pinned when asked), num_slots x slot_bytes. A batch
// handed to Python is a set of tensors viewing its slot; the slot returns to the producers when the last
// of them is freed (from_blob deleters), so a batch stays valid for as long as anything references it.
// Methods of a torch custom class run with the GIL released, so waits and the C++ gather never block
// Python threads.
#include <ATen/ATen.h>
#include <torch/custom_class.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <limits>
#include <memory>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "ring_buffer.h"

namespace hetrain {
namespace {

constexpr int64_t kAlign = 64;  // each field starts on a cache line
// A slot's bytes at most (2^48, 256 TiB): far past any batch, and far enough below int64's end that the
// rounding up and num_slots x slot_bytes cannot wrap.
constexpr int64_t kMaxSlotBytes = int64_t(1) << 48;

int64_t round_up(int64_t n) { return (n + kAlign - 1) / kAlign * kAlign; }

at::ScalarType dtype_named(const std::string& name) {
  if (name == "int64") return at::kLong;
  if (name == "int32") return at::kInt;
  if (name == "int16") return at::kShort;
  if (name == "uint8") return at::kByte;
  if (name == "bool") return at::kBool;
  if (name == "float32") return at::kFloat;
  if (name == "float16") return at::kHalf;
  if (name == "bfloat16") return at::kBFloat16;
  if (name == "float64") return at::kDouble;
  TORCH_CHECK(false, "hetrain.RingBuffer: unsupported field dtype '", name,
              "' (int64, int32, int16, uint8, bool, float32, float16, bfloat16, float64)");
}

// Owned jointly by the Python object and every tensor lent out: the slots outlive whichever goes last.
struct RingState {
  at::Tensor slab;  // (num_slots, slot_bytes) uint8
  std::unique_ptr<ring::RingCore> core;
  std::unique_ptr<ring::TokenGatherer> gatherer;
  std::vector<at::ScalarType> dtypes;
  std::vector<int64_t> capacities, offsets;
  int64_t slot_bytes = 0;
  // The process that first used the ring's synchronisation (started an epoch, attached a token file, claimed, took
  // or drained), so that its threads may be inside; 0 before. A ring made but not yet used goes to whichever
  // process uses it first, a child forked after making it included.
  std::atomic<pid_t> owner{0};

  // Records this process as the owner if none is yet (see owner).
  void use() {
    pid_t none = 0;
    owner.compare_exchange_strong(none, ::getpid());
  }

  // Whether this is a process forked from the ring's owner. Its copy of the ring's locks and condition variables
  // records the owner's threads (a lock may be copied held, a wait as pending), and its thread handles name threads
  // it does not have: closing, releasing a slot or freeing the ring there hung, aborted or joined another thread.
  // A child leaves the ring alone, and leaks it when freed.
  bool forked() const {
    const pid_t by = owner.load();
    return by != 0 && by != ::getpid();
  }

  ~RingState() {
    if (forked()) {
      (void)gatherer.release();
      (void)core.release();
      return;
    }
    if (gatherer) gatherer->stop();
  }
};

// A taken batch's hold on its slot, shared by the deleters of the batch's tensors: the slot goes back to the
// producers when the last copy goes, also when building the batch failed part way.
class SlotLease {
 public:
  SlotLease(std::shared_ptr<RingState> st, int64_t slot) : st_(std::move(st)), slot_(slot) {}
  SlotLease(const SlotLease&) = delete;
  SlotLease& operator=(const SlotLease&) = delete;
  ~SlotLease() {
    if (!st_->forked()) st_->core->release(slot_);
  }

 private:
  std::shared_ptr<RingState> st_;
  int64_t slot_;
};

// Refuses a timeout that is not a number of seconds (the core waits without end for inf or huge ones).
void check_timeout(double timeout) {
  TORCH_CHECK(!std::isnan(timeout), "hetrain.RingBuffer: the timeout is NaN; pass seconds (inf waits without end)");
}

// Runs `f`, turning the core's exceptions into torch errors (RuntimeError in Python) with the same text.
template <typename F>
auto guarded(F&& f) -> decltype(f()) {
  try {
    return f();
  } catch (const c10::Error&) {
    throw;
  } catch (const std::exception& e) {
    TORCH_CHECK(false, e.what());
  }
}

class RingBuffer : public torch::CustomClassHolder {
 public:
  // held_limit: see ring::RingCore (the loader passes its bound; a ring made here without it has none).
  RingBuffer(std::vector<std::string> dtypes, std::vector<int64_t> capacities, int64_t num_slots,
             int64_t num_producers, bool pin, double stall_timeout, double held_limit)
      : st_(std::make_shared<RingState>()) {
    TORCH_CHECK(!dtypes.empty() && dtypes.size() == capacities.size(),
                "hetrain.RingBuffer: need one capacity per field dtype, got ", dtypes.size(), " dtypes and ",
                capacities.size(), " capacities");
    TORCH_CHECK(num_slots >= 1 && num_producers >= 1 && stall_timeout > 0 && held_limit > 0,
                "hetrain.RingBuffer: need num_slots >= 1, num_producers >= 1, stall_timeout > 0, held_limit > 0; got ",
                num_slots, ", ", num_producers, ", ", stall_timeout, ", ", held_limit);
    for (size_t f = 0; f < dtypes.size(); ++f) {
      st_->dtypes.push_back(dtype_named(dtypes[f]));
      const int64_t item = static_cast<int64_t>(c10::elementSize(st_->dtypes.back()));
      // Bounded so no byte count below wraps: a wrapped slot would be smaller than the views taken of it.
      TORCH_CHECK(capacities[f] >= 1 && capacities[f] <= (kMaxSlotBytes - st_->slot_bytes) / item,
                  "hetrain.RingBuffer: field ", f, " capacity must be in [1, ", (kMaxSlotBytes - st_->slot_bytes) / item,
                  "] (a slot holds at most ", kMaxSlotBytes, " bytes), got ", capacities[f]);
      st_->offsets.push_back(st_->slot_bytes);
      st_->slot_bytes += round_up(capacities[f] * item);
    }
    st_->capacities = std::move(capacities);
    // The only allocation of batch memory, ever: num_slots x slot_bytes.
    st_->slab = at::empty({num_slots, st_->slot_bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(pin));
    st_->slab.zero_();  // touch every page now, not in the first batches
    st_->core = std::make_unique<ring::RingCore>(num_slots, static_cast<int64_t>(st_->dtypes.size()), num_producers,
                                                 stall_timeout, held_limit);
  }

  ~RingBuffer() override { close(); }

  int64_t slot_bytes() const { return st_->slot_bytes; }
  int64_t nbytes() const { return st_->slab.numel(); }
  bool pinned() const { return st_->slab.is_pinned(); }

  // Full-capacity flat views of one slot's fields, for producers that write from Python.
  std::vector<at::Tensor> slot_views(int64_t slot) const {
    TORCH_CHECK(slot >= 0 && slot < st_->core->num_slots(), "hetrain.RingBuffer: no slot ", slot);
    std::vector<at::Tensor> views;
    for (size_t f = 0; f < st_->dtypes.size(); ++f) {
      const int64_t bytes = st_->capacities[f] * static_cast<int64_t>(c10::elementSize(st_->dtypes[f]));
      views.push_back(st_->slab[slot].narrow(0, st_->offsets[f], bytes).view(st_->dtypes[f]));
    }
    return views;
  }

  void start_epoch(int64_t num_jobs) {
    TORCH_CHECK(!st_->gatherer, "hetrain.RingBuffer: a token ring starts epochs with start_token_epoch");
    st_->use();
    guarded([&] { st_->core->start_epoch(num_jobs); });
  }

  // Stops handing out the current epoch's batches and waits up to `timeout` s for those being filled; true once
  // none is. Callers loop on short timeouts so that Ctrl-C reaches Python while a slow batch finishes.
  bool drain(double timeout) {
    check_timeout(timeout);
    st_->use();
    return guarded([&] { return st_->core->drain(timeout); });
  }

  std::tuple<int64_t, int64_t> claim(int64_t producer, double timeout) {
    check_producer(producer);
    check_timeout(timeout);
    int64_t slot = -1;
    st_->use();
    const int64_t job = st_->core->claim(producer, timeout, &slot);
    return {job, slot};
  }

  void note(int64_t producer, int64_t sample, int64_t byte_begin, int64_t byte_end) {
    check_producer(producer);
    st_->core->note(producer, sample, byte_begin, byte_end);
  }

  // shapes: per field ndim then 3 sizes (unused ones 0).
  void commit(int64_t producer, int64_t job, std::vector<int64_t> shapes) {
    check_producer(producer);
    check_job(job);
    const size_t fields = st_->dtypes.size();
    TORCH_CHECK(shapes.size() == fields * ring::kMetaPerField, "hetrain.RingBuffer.commit: need ",
                fields * ring::kMetaPerField, " shape numbers, got ", shapes.size());
    for (size_t f = 0; f < fields; ++f) {
      const int64_t* m = shapes.data() + f * ring::kMetaPerField;
      TORCH_CHECK(m[0] >= 0 && m[0] <= 3, "hetrain.RingBuffer.commit: field ", f, " has ndim ", m[0], " (0..3)");
      // The non-zero sizes' product, not numel, is bounded: with a 0 among them numel is 0 whatever the other
      // sizes, but take() computes strides from those, which would wrap (and the batch would be lost).
      int64_t extent = 1;  // never past the capacity (>= 1), so the product cannot wrap
      for (int64_t d = 0; d < m[0]; ++d) {
        TORCH_CHECK(m[1 + d] >= 0, "hetrain.RingBuffer.commit: field ", f, " has size ", m[1 + d], " in dim ", d);
        TORCH_CHECK(m[1 + d] == 0 || extent <= st_->capacities[f] / m[1 + d], "hetrain.RingBuffer.commit: field ",
                    f, " holds more elements than the ", st_->capacities[f], " a slot has room for (its sizes ",
                    "other than 0 multiply past that)");
        extent *= std::max<int64_t>(m[1 + d], 1);
      }
    }
    st_->core->commit(producer, job, shapes.data());
  }

  void fail(int64_t producer, int64_t job, std::string message) {
    check_producer(producer);
    check_job(job);
    st_->core->fail(producer, job, message);
  }

  // The batch `job` as tensors viewing its slot, or an empty list after `timeout` seconds.
  std::vector<at::Tensor> take(int64_t job, double timeout) {
    check_timeout(timeout);
    const size_t fields = st_->dtypes.size();
    std::vector<int64_t> meta(fields * ring::kMetaPerField);
    st_->use();
    const int64_t slot = guarded([&] { return st_->core->take(job, timeout, meta.data()); });
    if (slot < 0) return {};
    std::vector<at::Tensor> out;
    out.reserve(fields);
    // Each tensor's deleter holds a copy, dropped with the tensor (or with a from_blob that throws).
    const auto lease = std::make_shared<const SlotLease>(st_, slot);
    uint8_t* base = st_->slab.data_ptr<uint8_t>() + slot * st_->slot_bytes;
    for (size_t f = 0; f < fields; ++f) {
      const int64_t* m = meta.data() + f * ring::kMetaPerField;
      std::vector<int64_t> sizes(m + 1, m + 1 + m[0]);
      out.push_back(at::from_blob(base + st_->offsets[f], sizes, [lease](void*) {},
                                  at::TensorOptions().dtype(st_->dtypes[f])));
    }
    return out;
  }

  // The token-file fast path: C++ threads gather windows (starts, lengths: int64 per sample) into slots
  // with fields input_ids int64 [max_tokens], attention_mask bool [max_tokens], lengths and sample ids
  // int64 [max_rows]. Producers first_producer .. first_producer + num_threads - 1 are these threads.
  void attach_tokens(std::string path, int64_t itemsize, int64_t num_tokens, at::Tensor starts, at::Tensor lengths,
                     int64_t pad_id, int64_t vocab_size, int64_t num_threads, int64_t first_producer) {
    TORCH_CHECK(!st_->gatherer, "hetrain.RingBuffer: token file already attached");
    const std::vector<at::ScalarType> want{at::kLong, at::kBool, at::kLong, at::kLong};
    TORCH_CHECK(st_->dtypes == want && st_->capacities[0] == st_->capacities[1] &&
                    st_->capacities[2] == st_->capacities[3],
                "hetrain.RingBuffer: a token ring needs fields int64[T], bool[T], int64[R], int64[R]");
    for (const at::Tensor* t : {&starts, &lengths}) {
      TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->device().is_cpu(),
                  "hetrain.RingBuffer: window starts and lengths must be 1-D int64 CPU tensors");
    }
    TORCH_CHECK(starts.numel() == lengths.numel(), "hetrain.RingBuffer: ", starts.numel(), " starts but ",
                lengths.numel(), " lengths");
    const at::Tensor s = starts.contiguous(), l = lengths.contiguous();
    ring::TokenSlotLayout layout{st_->offsets[0], st_->offsets[1], st_->offsets[2], st_->offsets[3],
                                 st_->capacities[0], st_->capacities[2]};
    st_->use();  // the gatherer's threads start now
    guarded([&] {
      st_->gatherer = std::make_unique<ring::TokenGatherer>(
          st_->core.get(), st_->slab.data_ptr<uint8_t>(), st_->slot_bytes, layout, path, itemsize, num_tokens,
          std::vector<int64_t>(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + s.numel()),
          std::vector<int64_t>(l.data_ptr<int64_t>(), l.data_ptr<int64_t>() + l.numel()), pad_id, vocab_size,
          num_threads, first_producer);
    });
  }

  void start_token_epoch(at::Tensor sample_ids, at::Tensor batch_offsets) {
    TORCH_CHECK(st_->gatherer, "hetrain.RingBuffer: no token file attached");
    for (const at::Tensor* t : {&sample_ids, &batch_offsets}) {
      TORCH_CHECK(t->dim() == 1 && t->scalar_type() == at::kLong && t->device().is_cpu(),
                  "hetrain.RingBuffer: sample ids and batch offsets must be 1-D int64 CPU tensors");
    }
    TORCH_CHECK(batch_offsets.numel() >= 1, "hetrain.RingBuffer: batch offsets need at least one entry");
    const at::Tensor ids = sample_ids.contiguous(), off = batch_offsets.contiguous();
    guarded([&] {
      st_->gatherer->start_epoch(ids.data_ptr<int64_t>(), ids.numel(), off.data_ptr<int64_t>(), off.numel() - 1);
    });
  }

  // Stops every producer and joins the C++ threads; batches already handed out stay valid. Nothing in a process
  // forked from the ring's owner (see RingState::forked).
  void close() {
    if (st_->forked()) return;
    st_->core->close();
    if (st_->gatherer) st_->gatherer->stop();
  }

 private:
  void check_producer(int64_t producer) const {
    TORCH_CHECK(producer >= 0 && producer < st_->core->num_producers(), "hetrain.RingBuffer: no producer ", producer);
  }

  static void check_job(int64_t job) { TORCH_CHECK(job >= 0, "hetrain.RingBuffer: no batch ", job); }

  std::shared_ptr<RingState> st_;
};

}  // namespace
}  // namespace hetrain

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.class_<hetrain::RingBuffer>("RingBuffer")
      .def(torch::init<std::vector<std::string>, std::vector<int64_t>, int64_t, int64_t, bool, double, double>(), "",
           {torch::arg("dtypes"), torch::arg("capacities"), torch::arg("num_slots"), torch::arg("num_producers"),
            torch::arg("pin"), torch::arg("stall_timeout"),
            torch::arg("held_limit") = std::numeric_limits<double>::infinity()})
      .def("slot_bytes", &hetrain::RingBuffer::slot_bytes)
      .def("nbytes", &hetrain::RingBuffer::nbytes)
      .def("pinned", &hetrain::RingBuffer::pinned)
      .def("slot_views", &hetrain::RingBuffer::slot_views)
      .def("start_epoch", &hetrain::RingBuffer::start_epoch)
      .def("drain", &hetrain::RingBuffer::drain)
      .def("claim", &hetrain::RingBuffer::claim)
      .def("note", &hetrain::RingBuffer::note)
      .def("commit", &hetrain::RingBuffer::commit)
      .def("fail", &hetrain::RingBuffer::fail)
      .def("take", &hetrain::RingBuffer::take)
      .def("attach_tokens", &hetrain::RingBuffer::attach_tokens)
      .def("start_token_epoch", &hetrain::RingBuffer::start_token_epoch)
      .def("close", &hetrain::RingBuffer::close);
}
