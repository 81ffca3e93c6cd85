#include "tokenlake/store/cuda/peer_process_testing.h"

#include <fcntl.h>
#include <poll.h>
#include <spawn.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <iostream>
#include <random>
#include <thread>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "absl/strings/string_view.h"

extern char** environ;

namespace tokenlake::store {

std::string ExitMeaning(int code) {
  switch (code) {
    case kChildOk:
      return "0: ok";
    case kChildUsage:
      return "2: bad arguments or handle bytes";
    case kChildCudaError:
      return "3: a CUDA call failed";
    case kChildMismatch:
      return "4: bytes read back differ from the pattern";
    case kChildEventTooEarly:
      return "5: the event completed before the writer's work could run";
    case kChildTimeout:
      return "6: timed out waiting for the writer's work";
    case kChildChannel:
      return "7: the channel to the parent failed";
    case kChildUnexpected:
      return "8: an API broke its contract";
    default:
      break;
  }
  if (code >= kChildOpenFailedBase && code <= kChildOpenFailedBase + 16) {
    return absl::StrFormat(
        "%d: Open failed with %s", code,
        absl::StatusCodeToString(static_cast<absl::StatusCode>(code - kChildOpenFailedBase)));
  }
  if (code > 128) return absl::StrFormat("%d: killed by signal %d", code, code - 128);
  return absl::StrFormat("%d: unknown", code);
}

std::string ToHex(std::string_view bytes) {
  static constexpr char kDigits[] = "0123456789abcdef";
  std::string out;
  for (unsigned char c : bytes) {
    out += kDigits[c >> 4];
    out += kDigits[c & 15];
  }
  return out;
}

std::optional<std::string> FromHex(std::string_view hex) {
  auto digit = [](char c) -> int {
    if (c >= '0' && c <= '9') return c - '0';
    if (c >= 'a' && c <= 'f') return c - 'a' + 10;
    return -1;
  };
  if (hex.size() % 2 != 0) return std::nullopt;
  std::string out;
  for (size_t i = 0; i < hex.size(); i += 2) {
    const int hi = digit(hex[i]);
    const int lo = digit(hex[i + 1]);
    if (hi < 0 || lo < 0) return std::nullopt;
    out += static_cast<char>(hi * 16 + lo);
  }
  return out;
}

std::vector<uint8_t> Pattern(uint64_t seed, size_t bytes) {
  std::mt19937_64 rng(seed);
  std::vector<uint8_t> out(bytes);
  for (size_t i = 0; i < bytes; i += 8) {
    const uint64_t word = rng();
    for (size_t j = 0; j < 8 && i + j < bytes; ++j) {
      out[i + j] = static_cast<uint8_t>(word >> (8 * j));
    }
  }
  return out;
}

int64_t FirstDifference(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want) {
  if (got.size() != want.size()) return 0;
  auto [a, b] = std::mismatch(got.begin(), got.end(), want.begin());
  return a == got.end() ? -1 : a - got.begin();
}

std::string Region::ToArg() const { return absl::StrCat(offset, ":", bytes); }

std::optional<Region> Region::Parse(std::string_view arg) {
  std::vector<std::string> parts = absl::StrSplit(absl::string_view(arg.data(), arg.size()), ':');
  Region r;
  if (parts.size() != 2 || !absl::SimpleAtoi(parts[0], &r.offset) ||
      !absl::SimpleAtoi(parts[1], &r.bytes)) {
    return std::nullopt;
  }
  return r;
}

std::optional<std::string> ReadLine(int fd, std::string& buffer, TestClock::time_point deadline,
                                    std::string* why) {
  for (;;) {
    if (const size_t nl = buffer.find('\n'); nl != std::string::npos) {
      std::string line = buffer.substr(0, nl);
      buffer.erase(0, nl + 1);
      return line;
    }
    const auto left =
        std::chrono::duration_cast<std::chrono::milliseconds>(deadline - TestClock::now()).count();
    if (left <= 0) {
      *why = "timed out";
      return std::nullopt;
    }
    pollfd p{fd, POLLIN, 0};
    const int ready = ::poll(&p, 1, static_cast<int>(std::min<int64_t>(left, 1000)));
    if (ready < 0 && errno != EINTR) {
      *why = absl::StrCat("poll: ", std::strerror(errno));
      return std::nullopt;
    }
    if (ready <= 0) continue;
    char chunk[512];
    const ssize_t n = ::recv(fd, chunk, sizeof(chunk), 0);
    if (n == 0) {
      *why = "the other side closed the channel";
      return std::nullopt;
    }
    if (n < 0) {
      if (errno == EINTR) continue;
      *why = absl::StrCat("recv: ", std::strerror(errno));
      return std::nullopt;
    }
    buffer.append(chunk, static_cast<size_t>(n));
  }
}

bool SendLine(int fd, const std::string& line) {
  const std::string data = line + "\n";
  size_t sent = 0;
  while (sent < data.size()) {
    const ssize_t n = ::send(fd, data.data() + sent, data.size() - sent, MSG_NOSIGNAL);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    sent += static_cast<size_t>(n);
  }
  return true;
}

std::optional<std::string> ChildContext::Flag(const std::string& name) const {
  auto it = flags_.find(name);
  if (it == flags_.end()) return std::nullopt;
  return it->second;
}

std::optional<uint64_t> ChildContext::NumberFlag(const std::string& name) const {
  uint64_t value = 0;
  auto text = Flag(name);
  if (!text || !absl::SimpleAtoi(*text, &value)) return std::nullopt;
  return value;
}

int ChildContext::Fail(int code, const std::string& why) const {
  std::cerr << "[peer child " << mode_ << ", pid " << ::getpid() << "] " << why << " (exit "
            << ExitMeaning(code) << ")" << std::endl;
  return code;
}

void ChildContext::Say(const std::string& what) const {
  std::cout << "[peer child " << mode_ << ", pid " << ::getpid() << "] " << what << std::endl;
}

std::optional<std::string> ChildContext::ReadParentLine(std::string* why) {
  return store::ReadLine(kChildFd, buffer_, TestClock::now() + kChildDeadline, why);
}

bool IsChildInvocation(int argc, char** argv) {
  return argc >= 2 && std::strncmp(argv[1], kChildFlag, std::strlen(kChildFlag)) == 0;
}

int RunChild(int argc, char** argv, const std::map<std::string, ChildMode>& modes) {
  const std::string mode = argv[1] + std::strlen(kChildFlag);
  std::map<std::string, std::string> flags;
  for (int i = 2; i < argc; ++i) {
    const std::string arg = argv[i];
    const size_t eq = arg.find('=');
    if (arg.rfind("--", 0) != 0 || eq == std::string::npos) {
      std::cerr << "[peer child " << mode << "] bad argument " << arg << std::endl;
      return kChildUsage;
    }
    flags[arg.substr(2, eq - 2)] = arg.substr(eq + 1);
  }
  ChildContext c(mode, std::move(flags));
  // Die with the parent, so that a parent killed mid-test leaves no child behind; the pid check
  // covers a parent that died before the prctl.
  const std::optional<uint64_t> parent = c.NumberFlag("parent-pid");
  if (!parent) return c.Fail(kChildUsage, "missing --parent-pid");
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  if (static_cast<uint64_t>(::getppid()) != *parent) return c.Fail(kChildChannel, "orphaned");
  auto it = modes.find(mode);
  if (it == modes.end()) return c.Fail(kChildUsage, "unknown mode");
  return it->second(c);
}

absl::StatusOr<std::unique_ptr<Child>> Child::Start(const std::string& mode,
                                                    const std::vector<std::string>& flags) {
  int sv[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) {
    return absl::InternalError(absl::StrCat("socketpair: ", std::strerror(errno)));
  }
  // Moved to a descriptor >= 10 so that the dup2 onto fd 3 below is never a no-op (which would
  // leave close-on-exec set).
  const int child_end = ::fcntl(sv[1], F_DUPFD_CLOEXEC, 10);
  ::close(sv[1]);
  if (child_end < 0) {
    ::close(sv[0]);
    return absl::InternalError(absl::StrCat("fcntl: ", std::strerror(errno)));
  }
  std::vector<std::string> args = {"/proc/self/exe", absl::StrCat(kChildFlag, mode),
                                   absl::StrCat("--parent-pid=", ::getpid())};
  args.insert(args.end(), flags.begin(), flags.end());
  std::vector<char*> argv;
  argv.reserve(args.size() + 1);
  for (std::string& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, child_end, kChildFd);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, "/proc/self/exe", &actions, nullptr, argv.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  ::close(child_end);
  if (rc != 0) {
    ::close(sv[0]);
    return absl::InternalError(absl::StrCat("posix_spawn: ", std::strerror(rc)));
  }
  return std::unique_ptr<Child>(new Child(pid, sv[0]));
}

Child::~Child() {
  if (!reaped_) {
    ::kill(pid_, SIGKILL);
    int status = 0;
    ::waitpid(pid_, &status, 0);
  }
  ::close(fd_);
}

std::optional<std::string> Child::ReadLine(std::string* why) {
  return store::ReadLine(fd_, buffer_, TestClock::now() + kChildDeadline, why);
}

bool Child::SendLine(const std::string& line) { return store::SendLine(fd_, line); }

std::optional<int> Child::Wait(std::chrono::milliseconds timeout) {
  const auto deadline = TestClock::now() + timeout;
  for (;;) {
    int status = 0;
    const pid_t r = ::waitpid(pid_, &status, WNOHANG);
    if (r == pid_) {
      reaped_ = true;
      return WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    }
    if (r < 0 && errno != EINTR) {
      reaped_ = true;  // nothing left to reap
      std::cerr << "waitpid(" << pid_ << "): " << std::strerror(errno) << std::endl;
      return 255;
    }
    if (TestClock::now() >= deadline) {
      ::kill(pid_, SIGKILL);
      ::waitpid(pid_, &status, 0);
      reaped_ = true;
      std::cerr << "child " << pid_ << " did not exit within " << timeout.count() << " ms: killed"
                << std::endl;
      return std::nullopt;
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
  }
}

}  // namespace tokenlake::store
