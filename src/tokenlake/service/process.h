// Child processes for `tokenlake serve`, the cluster tests and the load test: spawn a command
// that dies with its parent, signal it, wait for it with a deadline; and the port file through
// which a daemon that bound port 0 reports its ports.
//
// Thread-safety: ChildProcess is not thread-safe; the free functions are.
#ifndef TOKENLAKE_SERVICE_PROCESS_H_
#define TOKENLAKE_SERVICE_PROCESS_H_

#include <sys/types.h>

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"

namespace tokenlake::service {

class ChildProcess {
 public:
  // Starts argv[0] (a path) with argv, stdout and stderr appended to `log_path` (empty: kept),
  // and this process's environment plus `extra_env` ("NAME=VALUE" entries, overriding; the way
  // to hand a child a secret without showing it on its command line).
  // The child gets SIGKILL if this process dies (PR_SET_PDEATHSIG), so none is left behind.
  // Errors: InvalidArgument (empty argv, an extra_env entry without '='), Internal (fork failed).
  static absl::StatusOr<std::unique_ptr<ChildProcess>> Spawn(
      const std::vector<std::string>& argv, const std::string& log_path = "",
      const std::vector<std::string>& extra_env = {});
  // Kills (SIGKILL) and reaps the child if it still runs.
  ~ChildProcess();

  pid_t pid() const { return pid_; }
  bool running();
  // Sends `signal` (no-op once reaped).
  void Signal(int signal);
  // Waits for the exit, up to `timeout`. Returns the exit code (128 + signal when killed).
  // Errors: DeadlineExceeded (still running).
  absl::StatusOr<int> Wait(absl::Duration timeout);
  // SIGTERM, wait up to `grace`, then SIGKILL and wait. Returns the exit code.
  int Stop(absl::Duration grace);

 private:
  explicit ChildProcess(pid_t pid) : pid_(pid) {}
  pid_t pid_;
  bool reaped_ = false;
  int exit_code_ = 0;
};

// The running executable (/proc/self/exe resolved).
std::string SelfExecutable();

// Writes `contents` to `path` atomically (temporary file + rename).
absl::Status WriteFileAtomically(const std::string& path, const std::string& contents);

// Waits until `path` exists and is non-empty, returning its contents. `give_up` (optional) is
// polled while waiting: when it returns true the wait ends (e.g. the process that should write
// the file has exited).
// Errors: DeadlineExceeded naming the path; Aborted when `give_up` said so.
absl::StatusOr<std::string> WaitForFile(const std::string& path, absl::Duration timeout,
                                        const std::function<bool()>& give_up = nullptr);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_PROCESS_H_
