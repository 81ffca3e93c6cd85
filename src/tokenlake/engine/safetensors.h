// SafetensorsFile: a reader for the Hugging Face safetensors format.
//
// Format: an 8-byte little-endian unsigned header length N, then N bytes of JSON (an object:
// tensor name -> {"dtype": "F32" | "BF16" | ..., "shape": [d0, d1, ...], "data_offsets":
// [begin, end]}, plus an optional "__metadata__" object of strings), then the data section;
// data_offsets are byte offsets into the data section, little-endian, row-major.
//
// Open maps the file read-only (mmap; the OS pages it in on demand, nothing is copied) and
// validates everything up front: header length within
// the file, valid JSON, every entry's dtype known, shape non-negative, offsets in bounds and
// matching shape x dtype size, no two tensors overlapping. After a successful Open every accessor
// is safe. Errors name the file and the tensor or field.
//
// Thread-safety: immutable after Open; every const method is safe from any thread.
#ifndef TOKENLAKE_ENGINE_SAFETENSORS_H_
#define TOKENLAKE_ENGINE_SAFETENSORS_H_

#include <cstddef>
#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tokenlake::engine {

// Element types of the format. Conversion to float32 is supported for kF32, kBF16 and kF16.
enum class TensorDtype : uint8_t { kF64, kF32, kF16, kBF16, kI64, kI32, kI16, kI8, kU8, kBool };

// Bytes per element of `dtype`.
int64_t TensorDtypeBytes(TensorDtype dtype);
// IEEE binary16 <-> float32: HalfToFloat is exact; FloatToHalf rounds to nearest, ties to even
// (overflow to +-inf, NaN stays a quiet NaN with its sign). Pure and thread-safe.
float HalfToFloat(uint16_t bits);
uint16_t FloatToHalf(float value);
// The format's name of `dtype` ("F32", "BF16", ...).
const char* TensorDtypeName(TensorDtype dtype);

struct TensorInfo {
  std::string name;
  TensorDtype dtype = TensorDtype::kF32;
  std::vector<int64_t> shape;
  // Byte range [begin, end) inside the data section.
  int64_t begin = 0;
  int64_t end = 0;

  int64_t num_elements() const;
};

class SafetensorsFile {
 public:
  // Maps and validates `path`.
  // Errors: NotFound (cannot open the file), DataLoss (not a regular file, or it cannot be
  //   mapped), InvalidArgument (bad header: length, JSON, an entry's dtype / shape /
  //   data_offsets; the message names the file and the tensor).
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> Open(const std::string& path);

  // As Open, over bytes already in memory; `source_name` is used in messages.
  static absl::StatusOr<std::unique_ptr<SafetensorsFile>> FromBytes(std::string bytes,
                                                                    std::string source_name);

  ~SafetensorsFile();
  SafetensorsFile(const SafetensorsFile&) = delete;
  SafetensorsFile& operator=(const SafetensorsFile&) = delete;

  // The tensor called `name`, or nullptr.
  const TensorInfo* Find(const std::string& name) const;
  // All tensors, sorted by name.
  const std::map<std::string, TensorInfo>& tensors() const { return tensors_; }
  // The "__metadata__" strings (empty when absent).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  // The raw bytes of `tensor`. REQUIRES: tensor came from this file.
  absl::Span<const std::byte> Data(const TensorInfo& tensor) const;

  // Returns tensor `name` converted to float32 (row-major), after checking its shape.
  // Errors: NotFound (no such tensor; names file and tensor), InvalidArgument (shape differs
  //   from expected_shape: both are printed), Unimplemented (dtype not F32/BF16/F16).
  absl::StatusOr<std::vector<float>> ReadFloat32(const std::string& name,
                                                 absl::Span<const int64_t> expected_shape) const;

  const std::string& source_name() const { return source_name_; }

 private:
  SafetensorsFile() = default;
  absl::Status Parse();

  std::string source_name_;
  std::string owned_;        // the image, for FromBytes
  void* mapping_ = nullptr;  // the mmap of the file, for Open (nullptr if none)
  size_t mapping_bytes_ = 0;
  const char* base_ = nullptr;  // the image: owned_ or the mapping
  size_t size_ = 0;
  int64_t data_begin_ = 0;  // offset of the data section in the image
  std::map<std::string, TensorInfo> tensors_;
  std::map<std::string, std::string> metadata_;
};

// A tensor's entry in a header that is being written: name, dtype and shape (its bytes follow
// the previous tensor's in the data section).
struct TensorLayout {
  std::string name;
  TensorDtype dtype = TensorDtype::kF32;
  std::vector<int64_t> shape;
};

// The start of a safetensors file (the 8-byte length, the JSON header, spaces up to a multiple
// of 8 bytes so that the data section is aligned as the format's own writer does) for tensors
// stored back to back in the given order, each shape x dtype bytes. The caller then writes the
// tensors' bytes in that order: a file can be streamed to disk without holding it in memory.
// REQUIRES: names unique, not "__metadata__".
std::string SafetensorsHeader(const std::vector<TensorLayout>& tensors,
                              const std::map<std::string, std::string>& metadata = {});

// Builds a safetensors file image (for tests and tools): tensors in the given order, each with
// its dtype, shape and raw little-endian bytes (SafetensorsHeader + the bytes).
// REQUIRES: bytes sizes match shape x dtype.
struct TensorToWrite {
  std::string name;
  TensorDtype dtype = TensorDtype::kF32;
  std::vector<int64_t> shape;
  std::string bytes;
};
std::string SerializeSafetensors(const std::vector<TensorToWrite>& tensors,
                                 const std::map<std::string, std::string>& metadata = {});

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_SAFETENSORS_H_
