#include "tokenlake/engine/pool_shape.h"

namespace tokenlake::engine {

plan::ModelShape PoolModelShape(const LlamaConfig& config, attention::KvDtype kv_dtype) {
  return plan::ModelShape{.num_layers = config.num_layers,
                          .num_heads = config.num_heads,
                          .num_kv_heads = config.num_kv_heads,
                          .head_dim = config.head_dim,
                          .dtype_bytes = static_cast<int32_t>(attention::KvDtypeBytes(kv_dtype))};
}

attention::KvSlotLayout PoolSlotLayout(const LlamaConfig& config, int32_t segment_tokens,
                                       attention::KvDtype kv_dtype) {
  return attention::KvSlotLayout{.num_layers = config.num_layers,
                                 .segment_tokens = segment_tokens,
                                 .num_kv_heads = config.num_kv_heads,
                                 .head_dim = config.head_dim,
                                 .dtype = kv_dtype};
}

lake::LakeOptions PoolLakeOptions(const LlamaConfig& config, const PoolSize& size,
                                  attention::KvDtype kv_dtype) {
  lake::LakeOptions o;
  o.num_instances = size.num_instances;
  o.segment_tokens = size.segment_tokens;
  o.slots_per_instance = size.slots_per_instance;
  o.heavy_hitter.num_instances = size.num_instances;
  o.model = PoolModelShape(config, kv_dtype);
  return o;
}

}  // namespace tokenlake::engine
