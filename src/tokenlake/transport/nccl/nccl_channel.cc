#include "tokenlake/transport/nccl/nccl_channel.h"

#include <limits>
#include <string>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"

namespace tokenlake::transport::nccl {
namespace {

absl::Status FromNccl(ncclResult_t result, const char* what, ncclComm_t comm = nullptr) {
  if (result == ncclSuccess) return absl::OkStatus();
  std::string detail = ncclGetErrorString(result);
  const char* last = ncclGetLastError(comm);
  if (last != nullptr && last[0] != '\0') detail = absl::StrFormat("%s (%s)", detail, last);
  std::string message =
      absl::StrFormat("%s: NCCL error %d: %s", what, static_cast<int>(result), detail);
  if (result == ncclInvalidArgument || result == ncclInvalidUsage) {
    return absl::InvalidArgumentError(message);
  }
  return absl::InternalError(message);
}

absl::Status FromCuda(cudaError_t error, const char* what) {
  if (error == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();  // clear a sticky launch error of this thread
  return absl::InternalError(absl::StrFormat("%s: CUDA error %d: %s", what, static_cast<int>(error),
                                             cudaGetErrorString(error)));
}

absl::Status CheckDeviceCount(int device) {
  int count = 0;
  cudaError_t error = cudaGetDeviceCount(&count);
  if (error != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError("NCCL transport: no CUDA device is present");
  }
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrFormat("device %d is out of [0, %d)", device, count));
  }
  return absl::OkStatus();
}

// Product of dims with overflow and sign checks; `field` names the tensor ("queries", ...).
absl::StatusOr<int64_t> Elements(const char* field, int64_t num_tokens, int64_t num_heads,
                                 int64_t head_dim) {
  if (num_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s.num_tokens is %d, must be >= 0", field, num_tokens));
  }
  if (num_heads < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s.num_heads is %d, must be >= 1", field, num_heads));
  }
  if (head_dim < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s.head_dim is %d, must be >= 1", field, head_dim));
  }
  constexpr int64_t kMax = std::numeric_limits<int64_t>::max() / 8;
  if (num_heads > kMax / head_dim || (num_tokens > 0 && num_heads * head_dim > kMax / num_tokens)) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %d x %d x %d elements overflow", field,
                                                      num_tokens, num_heads, head_dim));
  }
  return num_tokens * num_heads * head_dim;
}

// Non-empty buffers must be non-null device memory of `device`.
absl::Status CheckBuffer(const char* field, const void* data, int64_t bytes, int device) {
  if (bytes == 0) return absl::OkStatus();
  if (data == nullptr) return absl::InvalidArgumentError(absl::StrFormat("%s is null", field));
  cudaPointerAttributes attributes{};
  cudaError_t error = cudaPointerGetAttributes(&attributes, data);
  if (error != cudaSuccess) {
    cudaGetLastError();
    return absl::InvalidArgumentError(
        absl::StrFormat("%s is not a CUDA pointer (%s)", field, cudaGetErrorString(error)));
  }
  if ((attributes.type != cudaMemoryTypeDevice && attributes.type != cudaMemoryTypeManaged) ||
      attributes.device != device) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s is not device memory of device %d", field, device));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<int64_t> QueryTensorBytes(const QueryTensor& queries) {
  if (queries.dtype != QueryDtype::kBFloat16 && queries.dtype != QueryDtype::kFloat32) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "queries.dtype is %d, must be kBFloat16 or kFloat32", static_cast<int>(queries.dtype)));
  }
  absl::StatusOr<int64_t> elements =
      Elements("queries", queries.num_tokens, queries.num_heads, queries.head_dim);
  if (!elements.ok()) return elements.status();
  return *elements * (queries.dtype == QueryDtype::kBFloat16 ? 2 : 4);
}

absl::StatusOr<int64_t> PartialOutBytes(const PartialTensor& partial) {
  absl::StatusOr<int64_t> elements =
      Elements("partial", partial.num_tokens, partial.num_heads, partial.head_dim);
  if (!elements.ok()) return elements.status();
  return *elements * 4;
}

absl::StatusOr<int64_t> PartialLseBytes(const PartialTensor& partial) {
  absl::StatusOr<int64_t> elements =
      Elements("partial", partial.num_tokens, partial.num_heads, partial.head_dim);
  if (!elements.ok()) return elements.status();
  return partial.num_tokens * partial.num_heads * 4;
}

// ---- NcclComm -------------------------------------------------------------------------------

absl::StatusOr<ncclUniqueId> NcclComm::NewUniqueId() {
  ncclUniqueId id;
  absl::Status status = FromNccl(ncclGetUniqueId(&id), "ncclGetUniqueId");
  if (!status.ok()) return status;
  return id;
}

absl::StatusOr<std::unique_ptr<NcclComm>> NcclComm::Create(int rank, int world,
                                                           const ncclUniqueId& id, int device) {
  if (world < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("world is %d, must be >= 1", world));
  }
  if (rank < 0 || rank >= world) {
    return absl::InvalidArgumentError(absl::StrFormat("rank %d is out of [0, %d)", rank, world));
  }
  if (absl::Status status = CheckDeviceCount(device); !status.ok()) return status;
  if (absl::Status status = FromCuda(cudaSetDevice(device), "cudaSetDevice"); !status.ok()) {
    return status;
  }
  ncclComm_t comm = nullptr;
  if (absl::Status status = FromNccl(ncclCommInitRank(&comm, world, id, rank), "ncclCommInitRank");
      !status.ok()) {
    return status;
  }
  return std::unique_ptr<NcclComm>(new NcclComm(comm, rank, world, device));
}

absl::StatusOr<std::vector<std::unique_ptr<NcclComm>>> NcclComm::CreateAll(
    absl::Span<const int> devices) {
  if (devices.empty()) return absl::InvalidArgumentError("devices is empty");
  absl::flat_hash_set<int> seen;
  for (int device : devices) {
    if (absl::Status status = CheckDeviceCount(device); !status.ok()) return status;
    if (!seen.insert(device).second) {
      return absl::InvalidArgumentError(absl::StrFormat("devices repeats device %d", device));
    }
  }
  const int world = static_cast<int>(devices.size());
  std::vector<ncclComm_t> comms(devices.size(), nullptr);
  if (absl::Status status =
          FromNccl(ncclCommInitAll(comms.data(), world, devices.data()), "ncclCommInitAll");
      !status.ok()) {
    return status;
  }
  std::vector<std::unique_ptr<NcclComm>> out;
  out.reserve(devices.size());
  for (int i = 0; i < world; ++i) {
    out.push_back(std::unique_ptr<NcclComm>(new NcclComm(comms[i], i, world, devices[i])));
  }
  return out;
}

NcclComm::~NcclComm() {
  if (comm_ != nullptr) ncclCommDestroy(comm_);
}

absl::Status NcclComm::AsyncError() const {
  ncclResult_t async = ncclSuccess;
  if (absl::Status status = FromNccl(ncclCommGetAsyncError(comm_, &async), "ncclCommGetAsyncError");
      !status.ok()) {
    return status;
  }
  if (async == ncclSuccess || async == ncclInProgress) return absl::OkStatus();
  return absl::InternalError(absl::StrFormat("NCCL asynchronous error %d: %s",
                                             static_cast<int>(async), ncclGetErrorString(async)));
}

// ---- Batch ----------------------------------------------------------------------------------

absl::Status Batch::Add(bool send, int peer, std::initializer_list<Op> ops) {
  if (peer < 0 || peer >= comm_->world()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("peer %d is out of [0, %d)", peer, comm_->world()));
  }
  if (submitted_) return absl::FailedPreconditionError("batch was already submitted");
  for (Op op : ops) {
    if (op.bytes == 0) continue;
    op.send = send;
    op.peer = peer;
    ops_.push_back(op);
    (send ? send_bytes_ : recv_bytes_) += static_cast<int64_t>(op.bytes);
  }
  return absl::OkStatus();
}

absl::Status Batch::AddSendQueries(int peer, const QueryTensor& queries) {
  absl::StatusOr<int64_t> bytes = QueryTensorBytes(queries);
  if (!bytes.ok()) return bytes.status();
  if (absl::Status s = CheckBuffer("queries.data", queries.data, *bytes, comm_->device());
      !s.ok()) {
    return s;
  }
  return Add(true, peer, {Op{true, peer, queries.data, static_cast<size_t>(*bytes)}});
}

absl::Status Batch::AddRecvQueries(int peer, const QueryTensor& queries) {
  absl::StatusOr<int64_t> bytes = QueryTensorBytes(queries);
  if (!bytes.ok()) return bytes.status();
  if (absl::Status s = CheckBuffer("queries.data", queries.data, *bytes, comm_->device());
      !s.ok()) {
    return s;
  }
  return Add(false, peer, {Op{false, peer, queries.data, static_cast<size_t>(*bytes)}});
}

namespace {
absl::Status CheckPartial(const PartialTensor& partial, int device, int64_t* out_bytes,
                          int64_t* lse_bytes) {
  absl::StatusOr<int64_t> out = PartialOutBytes(partial);
  if (!out.ok()) return out.status();
  absl::StatusOr<int64_t> lse = PartialLseBytes(partial);
  if (!lse.ok()) return lse.status();
  if (absl::Status s = CheckBuffer("partial.out", partial.out, *out, device); !s.ok()) return s;
  if (absl::Status s = CheckBuffer("partial.lse", partial.lse, *lse, device); !s.ok()) return s;
  const char* out_begin = reinterpret_cast<const char*>(partial.out);
  const char* lse_begin = reinterpret_cast<const char*>(partial.lse);
  if (*out > 0 && out_begin < lse_begin + *lse && lse_begin < out_begin + *out) {
    return absl::InvalidArgumentError("partial.out and partial.lse overlap");
  }
  *out_bytes = *out;
  *lse_bytes = *lse;
  return absl::OkStatus();
}
}  // namespace

absl::Status Batch::AddSendPartial(int peer, const PartialTensor& partial) {
  int64_t out = 0, lse = 0;
  if (absl::Status s = CheckPartial(partial, comm_->device(), &out, &lse); !s.ok()) return s;
  return Add(true, peer,
             {Op{true, peer, partial.out, static_cast<size_t>(out)},
              Op{true, peer, partial.lse, static_cast<size_t>(lse)}});
}

absl::Status Batch::AddRecvPartial(int peer, const PartialTensor& partial) {
  int64_t out = 0, lse = 0;
  if (absl::Status s = CheckPartial(partial, comm_->device(), &out, &lse); !s.ok()) return s;
  return Add(false, peer,
             {Op{false, peer, partial.out, static_cast<size_t>(out)},
              Op{false, peer, partial.lse, static_cast<size_t>(lse)}});
}

absl::Status Batch::AddSendSegment(int peer, const SegmentBytes& segment) {
  if (segment.bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("segment.bytes is %d, must be >= 0", segment.bytes));
  }
  if (absl::Status s = CheckBuffer("segment.data", segment.data, segment.bytes, comm_->device());
      !s.ok()) {
    return s;
  }
  return Add(true, peer, {Op{true, peer, segment.data, static_cast<size_t>(segment.bytes)}});
}

absl::Status Batch::AddRecvSegment(int peer, const SegmentBytes& segment) {
  if (segment.bytes < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("segment.bytes is %d, must be >= 0", segment.bytes));
  }
  if (absl::Status s = CheckBuffer("segment.data", segment.data, segment.bytes, comm_->device());
      !s.ok()) {
    return s;
  }
  return Add(false, peer, {Op{false, peer, segment.data, static_cast<size_t>(segment.bytes)}});
}

absl::Status Batch::Issue() {
  for (const Op& op : ops_) {
    // Bytes as ncclUint8: any size, no alignment requirement.
    ncclResult_t result =
        op.send ? ncclSend(op.data, op.bytes, ncclUint8, op.peer, comm_->get(), stream_)
                : ncclRecv(op.data, op.bytes, ncclUint8, op.peer, comm_->get(), stream_);
    if (result != ncclSuccess) {
      return FromNccl(result, op.send ? "ncclSend" : "ncclRecv", comm_->get());
    }
  }
  return absl::OkStatus();
}

absl::Status Batch::Submit() {
  Batch* self = this;
  return SubmitAll(absl::MakeConstSpan(&self, 1));
}

absl::Status Batch::SubmitAll(absl::Span<Batch* const> batches) {
  for (const Batch* batch : batches) {
    if (batch == nullptr) return absl::FailedPreconditionError("SubmitAll: a batch is null");
    if (batch->submitted_) return absl::FailedPreconditionError("batch was already submitted");
  }
  bool any = false;
  for (const Batch* batch : batches) any = any || !batch->ops_.empty();
  for (Batch* batch : batches) batch->submitted_ = true;
  if (!any) return absl::OkStatus();
  if (absl::Status s = FromNccl(ncclGroupStart(), "ncclGroupStart"); !s.ok()) return s;
  absl::Status first = absl::OkStatus();
  for (Batch* batch : batches) {
    absl::Status s = batch->Issue();
    if (!s.ok()) {
      first = s;
      break;
    }
  }
  // Close the group whatever happened, so the thread's group depth stays balanced.
  absl::Status end = FromNccl(ncclGroupEnd(), "ncclGroupEnd");
  if (!first.ok()) return first;
  return end;
}

// ---- One-message conveniences ---------------------------------------------------------------

namespace {
// One Batch holding the single operation `add` puts in it, submitted.
template <typename AddFn>
absl::Status SubmitOne(NcclComm& comm, cudaStream_t stream, AddFn add) {
  Batch batch(&comm, stream);
  if (absl::Status s = add(batch); !s.ok()) return s;
  return batch.Submit();
}
}  // namespace

absl::Status SendQueries(NcclComm& comm, int peer, const QueryTensor& queries,
                         cudaStream_t stream) {
  return SubmitOne(comm, stream, [&](Batch& b) { return b.AddSendQueries(peer, queries); });
}
absl::Status RecvQueries(NcclComm& comm, int peer, const QueryTensor& queries,
                         cudaStream_t stream) {
  return SubmitOne(comm, stream, [&](Batch& b) { return b.AddRecvQueries(peer, queries); });
}
absl::Status SendPartial(NcclComm& comm, int peer, const PartialTensor& partial,
                         cudaStream_t stream) {
  return SubmitOne(comm, stream, [&](Batch& b) { return b.AddSendPartial(peer, partial); });
}
absl::Status RecvPartial(NcclComm& comm, int peer, const PartialTensor& partial,
                         cudaStream_t stream) {
  return SubmitOne(comm, stream, [&](Batch& b) { return b.AddRecvPartial(peer, partial); });
}
absl::Status SendSegment(NcclComm& comm, int peer, const SegmentBytes& segment,
                         cudaStream_t stream) {
  return SubmitOne(comm, stream, [&](Batch& b) { return b.AddSendSegment(peer, segment); });
}
absl::Status RecvSegment(NcclComm& comm, int peer, const SegmentBytes& segment,
                         cudaStream_t stream) {
  return SubmitOne(comm, stream, [&](Batch& b) { return b.AddRecvSegment(peer, segment); });
}

}  // namespace tokenlake::transport::nccl
