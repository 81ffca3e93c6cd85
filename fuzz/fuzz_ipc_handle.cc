// libFuzzer target: the CUDA IPC handle formats (store/cuda/ipc_handle.h). Any input must give a
// handle or a clear error; an accepted input must serialize back to the same bytes (the parser
// reads every byte it accepts).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>
#include <string_view>

#include "tokenlake/store/cuda/ipc_handle.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view bytes(reinterpret_cast<const char*>(data), size);
  auto arena = tokenlake::store::ArenaHandle::Parse(bytes);
  if (arena.ok() ? arena->Serialize() != bytes : arena.status().message().empty()) std::abort();
  auto event = tokenlake::store::EventHandle::Parse(bytes);
  if (event.ok() ? event->Serialize() != bytes : event.status().message().empty()) std::abort();
  return 0;
}
