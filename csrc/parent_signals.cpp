// A loader's child process (a DataLoader worker, a ring reader: hetrain/data/readers.py) that ends on its
// parent's SIGTERM only. SLURM and systemd send SIGTERM to every process of the job, and the child that died of it
// failed the fit GracefulStop was finishing; the parent stops its children itself, with SIGTERM as a last resort.
//
// Only a handler installed with SA_SIGINFO is told who sent the signal: Python's are not. A process-directed
// signal goes to whichever thread does not block it (OpenBLAS's, OpenMP's, torch's threads included), and the
// handler is the process's, so it acts the same in any of them; nothing is blocked, so a process started from the
// child gets SIGTERM as usual (exec resets a handled signal to its default, and a process forked without exec acts
// as the default too: the handler checks whose it is).
#include <signal.h>
#include <torch/library.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <cstdint>
#include <cstring>

namespace hetrain {
namespace {

// Read in the handler: lock-free atomics are async-signal-safe, and set before the handler is installed.
std::atomic<pid_t> parent_pid{0};
std::atomic<pid_t> own_pid{0};  // the process that installed the handler (a process forked from it inherits it)
std::atomic<bool> exit_success{false};
static_assert(std::atomic<pid_t>::is_always_lock_free && std::atomic<bool>::is_always_lock_free);

// SIGTERM's default action (the process ends, killed by SIGTERM): the signal is raised again once the handler
// returns, since the handler runs with SIGTERM blocked in its thread.
void die_of_sigterm() {
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  if (sigaction(SIGTERM, &dfl, nullptr) != 0) {
    _exit(128 + SIGTERM);
  }
  raise(SIGTERM);
}

void on_sigterm(int, siginfo_t* info, void*) {
  const int saved_errno = errno;  // the interrupted code's, should the signal be ignored
  if (getpid() != own_pid.load()) {
    die_of_sigterm();
  } else if (info->si_pid == parent_pid.load()) {
    if (exit_success.load()) {
      _exit(0);
    }
    die_of_sigterm();
  }
  errno = saved_errno;  // another process's SIGTERM (the job's): the parent decides when this process ends
}

// From now on this process ignores a SIGTERM that `parent` did not send; the parent's ends it with exit code 0
// (`success`: a DataLoader worker, as torch's own handler does) or as SIGTERM's default action does.
void filter_sigterm(int64_t parent, bool success) {
  TORCH_CHECK(parent > 0 && parent != ::getpid(), "hetrain.filter_sigterm: parent_pid must be another process's, got ",
              parent);
  parent_pid.store(static_cast<pid_t>(parent));
  own_pid.store(::getpid());
  exit_success.store(success);
  struct sigaction sa {};
  sa.sa_sigaction = on_sigterm;
  sa.sa_flags = SA_SIGINFO | SA_RESTART;  // an ignored SIGTERM leaves the interrupted system call running
  sigemptyset(&sa.sa_mask);
  TORCH_CHECK(sigaction(SIGTERM, &sa, nullptr) == 0, "hetrain.filter_sigterm: sigaction failed: ",
              std::strerror(errno));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(hetrain_C, m) {
  m.def("filter_sigterm(int parent_pid, bool exit_success) -> ()", &filter_sigterm);
}

}  // namespace hetrain
