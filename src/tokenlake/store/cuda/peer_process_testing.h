// Test support for tests that run a second process (peer_arena_test.cc): the test binary starts
// itself again as a peer ("child"), with a flag that selects what the child does, instead of
// fork (not supported once CUDA is initialised).
//
//   int main(int argc, char** argv) {
//     if (IsChildInvocation(argc, argv)) return RunChild(argc, argv, {{"open", ChildOpen}, ...});
//     ...GoogleTest...
//   }
//   auto child = Child::Start("open", {"--arena=" + ToHex(bytes)});   // in a test
//   EXPECT_EQ((*child)->Wait(), kChildOk);
//
// Parent and child talk over a socket pair (the child's end is its fd 3) in '\n'-terminated
// lines. Every wait has a deadline (kChildDeadline): a child that does not exit in time is
// killed (SIGKILL) and reaped; a child whose parent dies gets SIGKILL (PR_SET_PDEATHSIG); a Child
// object kills and reaps its process when destroyed. The child's stdout and stderr are the
// parent's, so its messages show in the test log; its exit code (ChildExit) says what happened.
//
// Thread-safety: none; one test thread drives a Child.
#ifndef TOKENLAKE_STORE_CUDA_PEER_PROCESS_TESTING_H_
#define TOKENLAKE_STORE_CUDA_PEER_PROCESS_TESTING_H_

#include <sys/types.h>

#include <chrono>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace tokenlake::store {

using TestClock = std::chrono::steady_clock;

inline constexpr char kChildFlag[] = "--peer-arena-child=";
inline constexpr int kChildFd = 3;  // the child's end of the socket pair
inline constexpr std::chrono::seconds kChildDeadline{60};

// What a child's exit code means. The child prints the details on stderr.
enum ChildExit : int {
  kChildOk = 0,
  kChildUsage = 2,           // bad arguments, or handle bytes that do not parse
  kChildCudaError = 3,       // a CUDA call of the test itself failed
  kChildMismatch = 4,        // bytes read back differ from the expected pattern
  kChildEventTooEarly = 5,   // an event or stream completed before the writer's work could run
  kChildTimeout = 6,         // the writer's work did not complete within the deadline
  kChildChannel = 7,         // the channel to the parent failed or closed early
  kChildUnexpected = 8,      // an API returned something other than what its contract says
  kChildOpenFailedBase = 10  // + absl::StatusCode: an Open failed with that code
};

// "13: Open failed with INVALID_ARGUMENT" and the like.
std::string ExitMeaning(int code);

// Lower-case hex of `bytes`, and back (nullopt for anything but lower-case hex pairs).
std::string ToHex(std::string_view bytes);
std::optional<std::string> FromHex(std::string_view hex);

// The tests' byte patterns: `bytes` pseudo-random bytes from `seed`.
std::vector<uint8_t> Pattern(uint64_t seed, size_t bytes);
// The first index where `got` and `want` differ, or -1 (0 if their sizes differ).
int64_t FirstDifference(const std::vector<uint8_t>& got, const std::vector<uint8_t>& want);

// A byte range, written "OFFSET:BYTES" on a command line.
struct Region {
  size_t offset = 0;
  size_t bytes = 0;
  std::string ToArg() const;
  static std::optional<Region> Parse(std::string_view arg);
};

// One line from `fd` (without its '\n'), waiting until `deadline`; `buffer` keeps what arrived
// after it. nullopt on timeout, end of stream or error, with `why` saying which.
std::optional<std::string> ReadLine(int fd, std::string& buffer, TestClock::time_point deadline,
                                    std::string* why);
// Sends `line` and a '\n' (no SIGPIPE if the other side has gone). False on failure.
bool SendLine(int fd, const std::string& line);

// What a child sees: its mode, its --name=value flags, its channel to the parent.
class ChildContext {
 public:
  ChildContext(std::string mode, std::map<std::string, std::string> flags)
      : mode_(std::move(mode)), flags_(std::move(flags)) {}

  const std::string& mode() const { return mode_; }
  std::optional<std::string> Flag(const std::string& name) const;
  std::optional<uint64_t> NumberFlag(const std::string& name) const;
  // Prints `why` on stderr with the mode and pid, and returns `code`.
  int Fail(int code, const std::string& why) const;
  // Prints progress on stdout with the mode and pid.
  void Say(const std::string& what) const;
  // The next line from the parent, waiting up to kChildDeadline.
  std::optional<std::string> ReadParentLine(std::string* why);

 private:
  std::string mode_;
  std::map<std::string, std::string> flags_;
  std::string buffer_;
};

using ChildMode = std::function<int(ChildContext&)>;

// True if argv[1] is kChildFlag + a mode: this process is a child.
bool IsChildInvocation(int argc, char** argv);
// Parses the child's command line, arranges SIGKILL on the parent's death, and runs the mode.
// Returns the process's exit code.
int RunChild(int argc, char** argv, const std::map<std::string, ChildMode>& modes);

// The parent's handle on a child: this binary started again with kChildFlag + `mode`, the given
// flags and --parent-pid. The destructor kills (SIGKILL) and reaps the child if it still runs.
class Child {
 public:
  // Errors: Internal (socketpair, posix_spawn).
  static absl::StatusOr<std::unique_ptr<Child>> Start(const std::string& mode,
                                                      const std::vector<std::string>& flags);
  ~Child();
  Child(const Child&) = delete;
  Child& operator=(const Child&) = delete;

  pid_t pid() const { return pid_; }
  // The child's next line, waiting up to kChildDeadline.
  std::optional<std::string> ReadLine(std::string* why);
  bool SendLine(const std::string& line);
  // The exit code (128 + signal if killed by one), or nullopt if the child did not exit within
  // `timeout`, in which case it has been killed and reaped.
  std::optional<int> Wait(std::chrono::milliseconds timeout = kChildDeadline);

 private:
  Child(pid_t pid, int fd) : pid_(pid), fd_(fd) {}

  pid_t pid_;
  int fd_;
  bool reaped_ = false;
  std::string buffer_;
};

}  // namespace tokenlake::store

#endif  // TOKENLAKE_STORE_CUDA_PEER_PROCESS_TESTING_H_
