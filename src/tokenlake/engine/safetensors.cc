#include "tokenlake/engine/safetensors.h"

#include <fcntl.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <bit>
#include <cerrno>
#include <cmath>
#include <cstring>
#include <limits>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::engine {
namespace {

using json = nlohmann::json;

// Largest header we accept (the format's own readers cap it at 100 MB).
constexpr uint64_t kMaxHeaderBytes = 100u << 20;

struct DtypeEntry {
  const char* name;
  TensorDtype dtype;
  int64_t bytes;
};
constexpr DtypeEntry kDtypes[] = {
    {"F64", TensorDtype::kF64, 8},   {"F32", TensorDtype::kF32, 4}, {"F16", TensorDtype::kF16, 2},
    {"BF16", TensorDtype::kBF16, 2}, {"I64", TensorDtype::kI64, 8}, {"I32", TensorDtype::kI32, 4},
    {"I16", TensorDtype::kI16, 2},   {"I8", TensorDtype::kI8, 1},   {"U8", TensorDtype::kU8, 1},
    {"BOOL", TensorDtype::kBool, 1},
};

std::string ShapeString(absl::Span<const int64_t> shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

}  // namespace

float HalfToFloat(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0) {
    // Zero or subnormal: mant * 2^-24.
    const float value = static_cast<float>(mant) * 5.9604644775390625e-8f;
    return sign ? -value : value;
  }
  if (exp == 31) return std::bit_cast<float>(sign | 0x7f800000u | (mant << 13));
  return std::bit_cast<float>(sign | ((exp + 112) << 23) | (mant << 13));
}

uint16_t FloatToHalf(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t abs = bits & 0x7fffffffu;
  if (abs > 0x7f800000u) return static_cast<uint16_t>(sign | 0x7e00u | ((abs >> 13) & 0x3ffu));
  if (abs >= 0x477ff000u) return static_cast<uint16_t>(sign | 0x7c00u);  // rounds past 65504
  if (abs < 0x38800000u) {
    // Below the smallest normal half (2^-14): a subnormal, mant = round(|x| * 2^24), exact in
    // float arithmetic (the product is a float with the same significand), ties to even by
    // nearbyint in the default rounding mode.
    const float scaled = std::bit_cast<float>(abs) * 16777216.0f;
    return static_cast<uint16_t>(sign | static_cast<uint16_t>(std::nearbyint(scaled)));
  }
  // Normal: rebias the exponent (127 -> 15) and round the 23-bit mantissa to 10 bits; a carry
  // out of the mantissa correctly bumps the exponent.
  const uint32_t rebased = abs - (112u << 23);
  const uint32_t lsb = (rebased >> 13) & 1u;
  return static_cast<uint16_t>(sign | ((rebased + 0xfffu + lsb) >> 13));
}

int64_t TensorDtypeBytes(TensorDtype dtype) {
  for (const auto& e : kDtypes) {
    if (e.dtype == dtype) return e.bytes;
  }
  return 0;
}

const char* TensorDtypeName(TensorDtype dtype) {
  for (const auto& e : kDtypes) {
    if (e.dtype == dtype) return e.name;
  }
  return "?";
}

int64_t TensorInfo::num_elements() const {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::Open(const std::string& path) {
  const int fd = ::open(path.c_str(), O_RDONLY | O_CLOEXEC);
  if (fd < 0) {
    return absl::NotFoundError(
        absl::StrCat(path, ": cannot open safetensors file: ", std::strerror(errno)));
  }
  struct stat st;
  if (::fstat(fd, &st) != 0 || !S_ISREG(st.st_mode)) {
    ::close(fd);
    return absl::DataLossError(absl::StrCat(path, ": not a regular file"));
  }
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->source_name_ = path;
  if (st.st_size > 0) {
    void* m = ::mmap(nullptr, static_cast<size_t>(st.st_size), PROT_READ, MAP_PRIVATE, fd, 0);
    if (m == MAP_FAILED) {
      const int err = errno;
      ::close(fd);
      return absl::DataLossError(absl::StrCat(path, ": cannot map the file: ", std::strerror(err)));
    }
    file->mapping_ = m;
    file->mapping_bytes_ = static_cast<size_t>(st.st_size);
    file->base_ = static_cast<const char*>(m);
    file->size_ = file->mapping_bytes_;
  }
  ::close(fd);
  TOKENLAKE_RETURN_IF_ERROR(file->Parse());
  return file;
}

absl::StatusOr<std::unique_ptr<SafetensorsFile>> SafetensorsFile::FromBytes(
    std::string bytes, std::string source_name) {
  std::unique_ptr<SafetensorsFile> file(new SafetensorsFile());
  file->owned_ = std::move(bytes);
  file->base_ = file->owned_.data();
  file->size_ = file->owned_.size();
  file->source_name_ = std::move(source_name);
  TOKENLAKE_RETURN_IF_ERROR(file->Parse());
  return file;
}

SafetensorsFile::~SafetensorsFile() {
  if (mapping_ != nullptr) ::munmap(mapping_, mapping_bytes_);
}

absl::Status SafetensorsFile::Parse() {
  const std::string& src = source_name_;
  if (size_ < 8) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: file of %d bytes is too short for the 8-byte header length", src, size_));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) {
    header_len = (header_len << 8) | static_cast<uint8_t>(base_[i]);
  }
  if (header_len > kMaxHeaderBytes) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: header length %d exceeds the limit of %d bytes", src, header_len, kMaxHeaderBytes));
  }
  if (header_len > size_ - 8) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: header length %d runs past the end of the file (%d bytes)", src, header_len, size_));
  }
  data_begin_ = 8 + static_cast<int64_t>(header_len);
  const int64_t data_size = static_cast<int64_t>(size_) - data_begin_;
  const json header = json::parse(base_ + 8, base_ + data_begin_, nullptr, false);
  if (header.is_discarded()) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": header is not valid JSON"));
  }
  if (!header.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": header is not a JSON object"));
  }
  for (auto it = header.begin(); it != header.end(); ++it) {
    const std::string& name = it.key();
    const json& entry = it.value();
    if (name == "__metadata__") {
      if (!entry.is_object()) {
        return absl::InvalidArgumentError(absl::StrCat(src, ": __metadata__ is not an object"));
      }
      for (auto m = entry.begin(); m != entry.end(); ++m) {
        if (!m.value().is_string()) {
          return absl::InvalidArgumentError(
              absl::StrCat(src, ": __metadata__ value of '", m.key(), "' is not a string"));
        }
        metadata_[m.key()] = m.value().get<std::string>();
      }
      continue;
    }
    const std::string where = absl::StrCat(src, ": tensor '", name, "'");
    if (!entry.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": entry is not an object"));
    }
    TensorInfo info;
    info.name = name;
    auto dtype_it = entry.find("dtype");
    if (dtype_it == entry.end() || !dtype_it->is_string()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": missing or non-string 'dtype'"));
    }
    const std::string dtype_name = dtype_it->get<std::string>();
    int64_t elem_bytes = 0;
    for (const auto& e : kDtypes) {
      if (dtype_name == e.name) {
        info.dtype = e.dtype;
        elem_bytes = e.bytes;
      }
    }
    if (elem_bytes == 0) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": unsupported dtype '", dtype_name, "'"));
    }
    auto shape_it = entry.find("shape");
    if (shape_it == entry.end() || !shape_it->is_array()) {
      return absl::InvalidArgumentError(absl::StrCat(where, ": missing or non-array 'shape'"));
    }
    int64_t num_elements = 1;
    for (const json& d : *shape_it) {
      if (!d.is_number_unsigned() && !(d.is_number_integer() && d.get<int64_t>() >= 0)) {
        return absl::InvalidArgumentError(
            absl::StrCat(where, ": 'shape' has a non-integer or negative dimension"));
      }
      const int64_t dim = d.get<int64_t>();
      if (dim < 0 || (dim > 0 && num_elements > std::numeric_limits<int64_t>::max() / 8 / dim)) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": 'shape' is too large"));
      }
      num_elements *= dim;
      info.shape.push_back(dim);
    }
    auto off_it = entry.find("data_offsets");
    if (off_it == entry.end() || !off_it->is_array() || off_it->size() != 2 ||
        !(*off_it)[0].is_number_integer() || !(*off_it)[1].is_number_integer()) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": 'data_offsets' must be an array of two integers"));
    }
    info.begin = (*off_it)[0].get<int64_t>();
    info.end = (*off_it)[1].get<int64_t>();
    if (info.begin < 0 || info.end < info.begin || info.end > data_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: data_offsets [%d, %d] out of bounds of the %d-byte data section",
                          where, info.begin, info.end, data_size));
    }
    if (info.end - info.begin != num_elements * elem_bytes) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: data_offsets [%d, %d] hold %d bytes but shape %s of %s needs %d",
                          where, info.begin, info.end, info.end - info.begin,
                          ShapeString(info.shape), dtype_name, num_elements * elem_bytes));
    }
    tensors_.emplace(name, std::move(info));
  }
  // No two tensors may share bytes.
  std::vector<const TensorInfo*> by_offset;
  for (const auto& [name, info] : tensors_) {
    if (info.end > info.begin) by_offset.push_back(&info);
  }
  std::sort(by_offset.begin(), by_offset.end(),
            [](const TensorInfo* a, const TensorInfo* b) { return a->begin < b->begin; });
  for (size_t i = 1; i < by_offset.size(); ++i) {
    if (by_offset[i]->begin < by_offset[i - 1]->end) {
      return absl::InvalidArgumentError(absl::StrCat(src, ": tensors '", by_offset[i - 1]->name,
                                                     "' and '", by_offset[i]->name,
                                                     "' overlap in the data section"));
    }
  }
  return absl::OkStatus();
}

const TensorInfo* SafetensorsFile::Find(const std::string& name) const {
  auto it = tensors_.find(name);
  return it == tensors_.end() ? nullptr : &it->second;
}

absl::Span<const std::byte> SafetensorsFile::Data(const TensorInfo& tensor) const {
  const auto* base = reinterpret_cast<const std::byte*>(base_) + data_begin_;
  return absl::Span<const std::byte>(base + tensor.begin,
                                     static_cast<size_t>(tensor.end - tensor.begin));
}

absl::StatusOr<std::vector<float>> SafetensorsFile::ReadFloat32(
    const std::string& name, absl::Span<const int64_t> expected_shape) const {
  const TensorInfo* info = Find(name);
  if (info == nullptr) {
    return absl::NotFoundError(absl::StrCat(source_name_, ": missing tensor '", name, "'"));
  }
  if (!std::equal(info->shape.begin(), info->shape.end(), expected_shape.begin(),
                  expected_shape.end())) {
    return absl::InvalidArgumentError(absl::StrCat(source_name_, ": tensor '", name, "' has shape ",
                                                   ShapeString(info->shape), ", expected ",
                                                   ShapeString(expected_shape)));
  }
  const absl::Span<const std::byte> data = Data(*info);
  const int64_t n = info->num_elements();
  std::vector<float> out(static_cast<size_t>(n));
  switch (info->dtype) {
    case TensorDtype::kF32:
      if (n > 0) std::memcpy(out.data(), data.data(), static_cast<size_t>(n) * 4);
      break;
    case TensorDtype::kBF16:
    case TensorDtype::kF16:
      for (int64_t i = 0; i < n; ++i) {
        uint16_t bits;
        std::memcpy(&bits, data.data() + 2 * i, 2);
        out[static_cast<size_t>(i)] = info->dtype == TensorDtype::kBF16
                                          ? std::bit_cast<float>(static_cast<uint32_t>(bits) << 16)
                                          : HalfToFloat(bits);
      }
      break;
    default:
      return absl::UnimplementedError(absl::StrCat(source_name_, ": tensor '", name, "' has dtype ",
                                                   TensorDtypeName(info->dtype),
                                                   "; only F32, BF16 and F16 are supported"));
  }
  return out;
}

std::string SafetensorsHeader(const std::vector<TensorLayout>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  json header = json::object();
  if (!metadata.empty()) header["__metadata__"] = metadata;
  int64_t offset = 0;
  for (const auto& t : tensors) {
    int64_t n = TensorDtypeBytes(t.dtype);
    for (int64_t d : t.shape) n *= d;
    header[t.name] = {{"dtype", TensorDtypeName(t.dtype)},
                      {"shape", t.shape},
                      {"data_offsets", {offset, offset + n}}};
    offset += n;
  }
  std::string text = header.dump();
  text.append((8 - text.size() % 8) % 8, ' ');
  std::string out(8, '\0');
  const uint64_t len = text.size();
  for (int i = 0; i < 8; ++i) {
    out[static_cast<size_t>(i)] = static_cast<char>((len >> (8 * i)) & 0xff);
  }
  return out + text;
}

std::string SerializeSafetensors(const std::vector<TensorToWrite>& tensors,
                                 const std::map<std::string, std::string>& metadata) {
  std::vector<TensorLayout> layout;
  size_t data_bytes = 0;
  for (const auto& t : tensors) {
    layout.push_back({t.name, t.dtype, t.shape});
    data_bytes += t.bytes.size();
  }
  std::string out = SafetensorsHeader(layout, metadata);
  out.reserve(out.size() + data_bytes);
  for (const auto& t : tensors) out += t.bytes;
  return out;
}

}  // namespace tokenlake::engine
