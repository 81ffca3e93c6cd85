#include "tokenlake/service/process.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cerrno>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace tokenlake::service {

absl::StatusOr<std::unique_ptr<ChildProcess>> ChildProcess::Spawn(
    const std::vector<std::string>& argv, const std::string& log_path,
    const std::vector<std::string>& extra_env) {
  if (argv.empty()) return absl::InvalidArgumentError("ChildProcess: empty argv");
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  // The environment is built before fork (only async-signal-safe calls after it).
  std::vector<std::string> names;
  for (const std::string& e : extra_env) {
    const size_t eq = e.find('=');
    if (eq == std::string::npos || eq == 0) {
      return absl::InvalidArgumentError("ChildProcess: an extra_env entry is not NAME=VALUE");
    }
    names.push_back(e.substr(0, eq + 1));
  }
  std::vector<char*> env;
  for (char** e = environ; e != nullptr && *e != nullptr; ++e) {
    bool overridden = false;
    for (const std::string& n : names) overridden |= std::strncmp(*e, n.c_str(), n.size()) == 0;
    if (!overridden) env.push_back(*e);
  }
  for (const std::string& e : extra_env) env.push_back(const_cast<char*>(e.c_str()));
  env.push_back(nullptr);
  int log_fd = -1;
  if (!log_path.empty()) {
    log_fd = ::open(log_path.c_str(), O_WRONLY | O_CREAT | O_APPEND | O_CLOEXEC, 0644);
    if (log_fd < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("ChildProcess: cannot open log %s: %s", log_path, std::strerror(errno)));
    }
  }
  const pid_t parent = ::getpid();
  const pid_t pid = ::fork();
  if (pid < 0) {
    if (log_fd >= 0) ::close(log_fd);
    return absl::InternalError(absl::StrFormat("ChildProcess: fork: %s", std::strerror(errno)));
  }
  if (pid == 0) {
    // Only async-signal-safe calls until exec.
    ::prctl(PR_SET_PDEATHSIG, SIGKILL);
    if (::getppid() != parent) ::_exit(127);
    if (log_fd >= 0) {
      ::dup2(log_fd, 1);
      ::dup2(log_fd, 2);
    }
    ::execve(args[0], args.data(), env.data());
    ::_exit(127);
  }
  if (log_fd >= 0) ::close(log_fd);
  return std::unique_ptr<ChildProcess>(new ChildProcess(pid));
}

ChildProcess::~ChildProcess() {
  if (!reaped_) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
  }
}

bool ChildProcess::running() { return !Wait(absl::ZeroDuration()).ok(); }

void ChildProcess::Signal(int signal) {
  if (!reaped_) ::kill(pid_, signal);
}

absl::StatusOr<int> ChildProcess::Wait(absl::Duration timeout) {
  if (reaped_) return exit_code_;
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      exit_code_ = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
      return exit_code_;
    }
    if (r < 0 && errno != EINTR) {
      reaped_ = true;
      exit_code_ = 255;
      return exit_code_;
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(absl::StrFormat("process %d still running after %s", pid_,
                                                         absl::FormatDuration(timeout)));
    }
    absl::SleepFor(absl::Milliseconds(5));
  }
}

int ChildProcess::Stop(absl::Duration grace) {
  Signal(SIGTERM);
  absl::StatusOr<int> code = Wait(grace);
  if (code.ok()) return *code;
  Signal(SIGKILL);
  code = Wait(absl::Seconds(10));
  return code.ok() ? *code : 255;
}

std::string SelfExecutable() {
  char buf[4096];
  const ssize_t n = ::readlink("/proc/self/exe", buf, sizeof(buf) - 1);
  if (n <= 0) return "";
  return std::string(buf, static_cast<size_t>(n));
}

absl::Status WriteFileAtomically(const std::string& path, const std::string& contents) {
  const std::string tmp = absl::StrFormat("%s.tmp.%d", path, ::getpid());
  {
    std::ofstream os(tmp, std::ios::trunc);
    os << contents;
    if (!os) return absl::InternalError(absl::StrFormat("cannot write %s", tmp));
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    return absl::InternalError(
        absl::StrFormat("cannot rename %s to %s: %s", tmp, path, std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::StatusOr<std::string> WaitForFile(const std::string& path, absl::Duration timeout,
                                        const std::function<bool()>& give_up) {
  const absl::Time deadline = absl::Now() + timeout;
  while (true) {
    std::ifstream is(path);
    if (is) {
      std::stringstream ss;
      ss << is.rdbuf();
      if (!ss.str().empty()) return ss.str();
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrFormat("%s did not appear within %s", path, absl::FormatDuration(timeout)));
    }
    if (give_up != nullptr && give_up()) {
      return absl::AbortedError(absl::StrFormat("%s: its writer gave up", path));
    }
    absl::SleepFor(absl::Milliseconds(10));
  }
}

}  // namespace tokenlake::service
