// NCCL transport of the GPU data plane: the bulk device tensors that move between instances on
// different GPUs (query tensors to a segment's holder, partial attention outputs back, and whole
// segment slots when a segment migrates), sent with NCCL point-to-point operations
// (ncclSend/ncclRecv inside ncclGroupStart/ncclGroupEnd) on the caller's CUDA stream.
//
// Split of responsibilities. The control messages (which request, which segment, how many query
// tokens, which shapes, which peer) travel on the host transport (transport/transport.h); this
// module moves only the tensor bytes they describe. The receiver therefore always knows, from a
// control message that arrived first, the exact shape it must post a receive for.
//
// Ordering rules (NCCL point-to-point semantics; the caller must keep them):
//   1. Between a pair of ranks (per communicator), the k-th send from A to B is matched with the
//      k-th receive on B from A, in the order the operations were issued (across groups and
//      within one group alike). Sends and receives carry no tag: the two sides must issue the
//      SAME sequence of tensors per peer pair, with the same shapes and dtypes (same byte counts;
//      a count mismatch is undefined behaviour in NCCL: truncation, corruption or a hang).
//   2. A partial is two NCCL messages, `out` then `lse`; a query tensor or a segment is one. Each
//      Send* call here issues exactly the messages its Recv* twin expects, in the same order, so
//      pairing Send* with the matching Recv* of the same shape keeps rule 1.
//   3. A rank that both sends to and receives from a peer must issue both in ONE group (a Batch)
//      or order them the same way on both sides; otherwise two blocking sends can deadlock.
//   4. One thread driving several ranks (several communicators of one process, e.g. CreateAll)
//      must submit all of their operations in one group: Batch::SubmitAll.
//   5. The operations run on the given stream in stream order: a send reads its buffer, and a
//      receive's buffer is complete, only when the stream reaches them. Buffers are borrowed until
//      then; the caller synchronises (event or stream) before reusing or reading them on another
//      stream.
//   NCCL supports a rank sending to itself (send and receive in one group), which is what one GPU
//   can test; it is a device-to-device copy, not NVLink.
//
// Errors. Every entry point validates its arguments before enqueuing anything and returns
// InvalidArgument naming the field (e.g. "partial.lse is null", "peer 3 is out of [0, 2)",
// "queries.data is not device memory of device 0"); nothing is enqueued then. NCCL or CUDA
// failures while enqueuing return Internal (or InvalidArgument for NCCL's own argument errors)
// with NCCL's message. Failures of the asynchronous work show at the caller's synchronisation and
// through NcclComm::AsyncError().
//
// Thread-safety: an NcclComm and a Batch are not thread-safe; use one thread per communicator at
// a time (NCCL's rule). Different communicators may be used from different threads.
#ifndef TOKENLAKE_TRANSPORT_NCCL_NCCL_CHANNEL_H_
#define TOKENLAKE_TRANSPORT_NCCL_NCCL_CHANNEL_H_

#include <cuda_runtime_api.h>
#include <nccl.h>

#include <cstddef>
#include <cstdint>
#include <initializer_list>
#include <memory>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tokenlake::transport::nccl {

// Element type of a query tensor.
enum class QueryDtype : uint8_t {
  kBFloat16 = 0,  // bfloat16 raw bits (what the CUDA attention kernels read)
  kFloat32 = 1,
};

// Query tokens of one request: `[num_tokens][num_heads][head_dim]` elements of `dtype`,
// row-major, contiguous, in device memory of the communicator's device. A send only reads it; a
// receive writes all of it.
struct QueryTensor {
  void* data = nullptr;  // may be null only when the tensor is empty
  QueryDtype dtype = QueryDtype::kBFloat16;
  int64_t num_tokens = 0;  // >= 0
  int64_t num_heads = 0;   // >= 1
  int64_t head_dim = 0;    // >= 1
};

// One partial attention output (attention/cuda/paged_attention.h conventions): `out` is
// `[num_tokens][num_heads][head_dim]` float32 and `lse` `[num_tokens][num_heads]` float32, both
// contiguous device memory of the communicator's device, not overlapping.
struct PartialTensor {
  float* out = nullptr;    // may be null only when the tensor is empty
  float* lse = nullptr;    // may be null only when the tensor is empty
  int64_t num_tokens = 0;  // >= 0
  int64_t num_heads = 0;   // >= 1
  int64_t head_dim = 0;    // >= 1
};

// A segment slot's bytes (attention.h's KvSlotLayout: all layers' K and V of one segment), or any
// contiguous device byte range of the communicator's device.
struct SegmentBytes {
  void* data = nullptr;  // may be null only when bytes == 0
  int64_t bytes = 0;     // >= 0
};

// One rank of an NCCL communicator, bound to one CUDA device. Owns the ncclComm_t.
class NcclComm {
 public:
  // A fresh unique id for Create: rank 0 makes it and hands it to the others (through the host
  // transport in a multi-process deployment). Errors: Internal from NCCL.
  static absl::StatusOr<ncclUniqueId> NewUniqueId();

  // Joins rank `rank` of `world` ranks on CUDA device `device` (ncclCommInitRank). BLOCKS until
  // all `world` ranks have called it with the same id: in one process, call it from one thread
  // per rank. Errors: InvalidArgument for world < 1, rank out of [0, world), or device out of
  // [0, cudaGetDeviceCount()); FailedPrecondition without a CUDA device; Internal from NCCL.
  static absl::StatusOr<std::unique_ptr<NcclComm>> Create(int rank, int world,
                                                          const ncclUniqueId& id, int device);

  // All ranks in this process, rank i on devices[i] (ncclCommInitAll); one thread may then drive
  // them all through Batch::SubmitAll. Errors: InvalidArgument for an empty list, a repeated
  // device or one out of range; FailedPrecondition without a CUDA device; Internal from NCCL.
  static absl::StatusOr<std::vector<std::unique_ptr<NcclComm>>> CreateAll(
      absl::Span<const int> devices);

  // Destroys the communicator (ncclCommDestroy). REQUIRES: no operation of it is still pending.
  ~NcclComm();
  NcclComm(const NcclComm&) = delete;
  NcclComm& operator=(const NcclComm&) = delete;

  int rank() const { return rank_; }
  int world() const { return world_; }
  int device() const { return device_; }
  ncclComm_t get() const { return comm_; }

  // OK, or the communicator's asynchronous error (ncclCommGetAsyncError) as Internal.
  absl::Status AsyncError() const;

 private:
  NcclComm(ncclComm_t comm, int rank, int world, int device)
      : comm_(comm), rank_(rank), world_(world), device_(device) {}

  ncclComm_t comm_;
  int rank_;
  int world_;
  int device_;
};

// Several point-to-point tensor transfers of one communicator, issued together in one NCCL group
// on one stream (the batch form: several tensors to several peers). Add* only validates and
// records; Submit issues. A Batch can be submitted once.
class Batch {
 public:
  // `comm` is borrowed and must outlive the Batch; `stream` is a stream of comm's device.
  Batch(NcclComm* comm, cudaStream_t stream) : comm_(comm), stream_(stream) {}

  // Each Add* validates its arguments (errors as in the file comment; the batch is unchanged on
  // error) and appends its messages. `peer` is a rank of the communicator (itself allowed).
  absl::Status AddSendQueries(int peer, const QueryTensor& queries);
  absl::Status AddRecvQueries(int peer, const QueryTensor& queries);
  absl::Status AddSendPartial(int peer, const PartialTensor& partial);
  absl::Status AddRecvPartial(int peer, const PartialTensor& partial);
  absl::Status AddSendSegment(int peer, const SegmentBytes& segment);
  absl::Status AddRecvSegment(int peer, const SegmentBytes& segment);

  // Number of NCCL messages recorded (a partial counts 2; empty tensors count 0).
  size_t num_messages() const { return ops_.size(); }
  // Bytes recorded to be sent, and to be received.
  int64_t send_bytes() const { return send_bytes_; }
  int64_t recv_bytes() const { return recv_bytes_; }

  // Issues every recorded message in one ncclGroupStart/ncclGroupEnd on the stream, in the order
  // they were added. An empty batch issues nothing. Errors: FailedPrecondition when already
  // submitted; Internal/InvalidArgument from NCCL or CUDA (the group is closed either way).
  absl::Status Submit();

  // Submits several batches (of different communicators, e.g. one per rank of CreateAll driven by
  // one thread) inside one outer NCCL group, which rule 4 of the file comment requires. Errors as
  // Submit; FailedPrecondition for a null or already submitted batch (nothing is issued then).
  static absl::Status SubmitAll(absl::Span<Batch* const> batches);

 private:
  struct Op {
    bool send = false;
    int peer = 0;
    void* data = nullptr;
    size_t bytes = 0;
  };
  // Validates peer and appends one message per non-empty buffer.
  absl::Status Add(bool send, int peer, std::initializer_list<Op> ops);
  // Issues the ops (inside an open group).
  absl::Status Issue();

  NcclComm* comm_;
  cudaStream_t stream_;
  std::vector<Op> ops_;
  int64_t send_bytes_ = 0;
  int64_t recv_bytes_ = 0;
  bool submitted_ = false;
};

// One-message conveniences: each builds a Batch of the one tensor and submits it. A rank sending
// to itself must use a Batch with both the send and the receive (rule 3), not these.
absl::Status SendQueries(NcclComm& comm, int peer, const QueryTensor& queries, cudaStream_t stream);
absl::Status RecvQueries(NcclComm& comm, int peer, const QueryTensor& queries, cudaStream_t stream);
absl::Status SendPartial(NcclComm& comm, int peer, const PartialTensor& partial,
                         cudaStream_t stream);
absl::Status RecvPartial(NcclComm& comm, int peer, const PartialTensor& partial,
                         cudaStream_t stream);
absl::Status SendSegment(NcclComm& comm, int peer, const SegmentBytes& segment,
                         cudaStream_t stream);
absl::Status RecvSegment(NcclComm& comm, int peer, const SegmentBytes& segment,
                         cudaStream_t stream);

// Byte sizes of the tensors (after validation): query data, partial out, partial lse.
// Errors: InvalidArgument naming the field for a negative or zero dimension or an overflow.
absl::StatusOr<int64_t> QueryTensorBytes(const QueryTensor& queries);
absl::StatusOr<int64_t> PartialOutBytes(const PartialTensor& partial);
absl::StatusOr<int64_t> PartialLseBytes(const PartialTensor& partial);

}  // namespace tokenlake::transport::nccl

#endif  // TOKENLAKE_TRANSPORT_NCCL_NCCL_CHANNEL_H_
