#include "core/kv_cache.hpp"

#include <cmath>
#include <sstream>
#include <string>

#include "core/routing.hpp"

namespace moba::core {
namespace {

std::string shape_of(const TensorView& t) {
  std::ostringstream s;
  s << '[';
  for (int i = 0; i < t.ndim && i < kMaxDims; ++i) s << (i ? ", " : "") << t.shape[i];
  s << ']';
  return s.str();
}

std::string str(int64_t x) {
  return std::to_string(x);
}

// Presence, rank, dtype, non-negative shape and strides.
void check_view(const TensorView& t, const std::string& name, int ndim, const char* layout,
                DType dtype) {
  if (t.ndim != ndim)
    fail(Status::invalid_argument,
         name + ": expected " + str(ndim) + " dimensions " + layout + ", got shape " + shape_of(t));
  for (int i = 0; i < ndim; ++i) {
    if (t.shape[i] < 0)
      fail(Status::invalid_argument, name + ": negative size in shape " + shape_of(t));
    if (t.strides[i] < 0) fail(Status::unsupported, name + ": negative strides are not supported");
  }
  if (t.data == nullptr && t.numel() != 0)
    fail(Status::invalid_argument, name + ": null data pointer");
  if (t.dtype != dtype)
    fail(Status::invalid_argument,
         name + ": expected dtype " + dtype_name(dtype) + ", got " + dtype_name(t.dtype));
}

void check_same_device(const TensorView& t, const std::string& name, const Device& device) {
  if (!(t.device == device))
    fail(Status::invalid_argument, name + ": on a different device than cache.k");
}

// What is known of a cu_seqlens tensor without reading it: rank, dtype, size.
void check_cu_view(const TensorView& cu, const char* name, int64_t batch) {
  check_view(cu, name, 1, "[batch + 1]", DType::int32);
  if (cu.shape[0] != batch + 1)
    fail(Status::invalid_argument, std::string(name) + ": expected " + str(batch + 1) +
                                       " entries (batch + 1, batch from the cache), got " +
                                       str(cu.shape[0]));
}

// The values of a host cu_seqlens, checked against the contract.
std::vector<int64_t> read_cu_seqlens(const TensorView& cu, const char* name, int64_t batch,
                                     int64_t total) {
  const auto* p = static_cast<const int32_t*>(cu.data);
  std::vector<int64_t> v(static_cast<size_t>(batch + 1));
  for (int64_t i = 0; i <= batch; ++i) v[static_cast<size_t>(i)] = p[i * cu.strides[0]];
  if (v[0] != 0)
    fail(Status::invalid_argument, std::string(name) + ": must start at 0, got " + str(v[0]));
  for (int64_t i = 1; i <= batch; ++i)
    if (v[static_cast<size_t>(i)] < v[static_cast<size_t>(i - 1)])
      fail(Status::invalid_argument, std::string(name) + ": must be non-decreasing, but entry " +
                                         str(i) + " (" + str(v[static_cast<size_t>(i)]) +
                                         ") < entry " + str(i - 1) + " (" +
                                         str(v[static_cast<size_t>(i - 1)]) + ")");
  if (v[static_cast<size_t>(batch)] != total)
    fail(Status::invalid_argument, std::string(name) + ": last entry must equal the " + str(total) +
                                       " rows of the tensor it describes, got " +
                                       str(v[static_cast<size_t>(batch)]));
  return v;
}

Rows new_rows(const Cache& c, const TensorView& t, const char* name) {
  check_view(t, name, 3, "[tokens, Hkv, D]", c.dtype);
  check_same_device(t, name, c.device);
  if (t.shape[1] != c.heads_kv || t.shape[2] != c.head_dim)
    fail(Status::invalid_argument, std::string(name) + ": expected shape [tokens, " +
                                       str(c.heads_kv) + ", " + str(c.head_dim) +
                                       "] (Hkv, D of the cache), got " + shape_of(t));
  if (t.strides[2] != 1)
    fail(Status::unsupported, std::string(name) + ": the last dimension must be contiguous");
  return Rows{t.data, t.dtype, t.strides[0], t.strides[1]};
}

}  // namespace

Cache make_cache(const KVCache& kv) {
  Cache c;
  if (kv.k.dtype != DType::float32 && kv.k.dtype != DType::float16 && kv.k.dtype != DType::bfloat16)
    fail(Status::unsupported, std::string("cache.k: unsupported dtype ") + dtype_name(kv.k.dtype) +
                                  "; expected float32, float16 or bfloat16");
  c.dtype = kv.k.dtype;
  c.device = kv.k.device;
  check_view(kv.k, "cache.k", 4, "[batch or pages, rows, Hkv, D]", c.dtype);
  check_view(kv.v, "cache.v", 4, "(that of cache.k)", c.dtype);
  check_same_device(kv.v, "cache.v", c.device);
  for (int i = 0; i < 4; ++i)
    if (kv.v.shape[i] != kv.k.shape[i])
      fail(Status::invalid_argument, "cache.v: expected shape " + shape_of(kv.k) +
                                         " (that of cache.k), got " + shape_of(kv.v));
  c.heads_kv = kv.k.shape[2];
  c.head_dim = kv.k.shape[3];
  if (c.heads_kv < 1)
    fail(Status::invalid_argument, "cache.k: expected at least 1 kv head, got " + str(c.heads_kv));
  if (c.head_dim < 8 || c.head_dim > 256 || c.head_dim % 8 != 0)
    fail(Status::unsupported, "cache.k: unsupported head dim " + str(c.head_dim) +
                                  "; expected a multiple of 8 in [8, 256]");
  if (kv.k.strides[3] != 1 || kv.v.strides[3] != 1)
    fail(Status::unsupported, "cache.k/cache.v: the last dimension must be contiguous");
  if (kv.block_size < 1)
    fail(Status::invalid_argument, "cache.block_size: expected >= 1, got " + str(kv.block_size));
  c.block_size = kv.block_size;
  c.k = CacheRows{kv.k.data, kv.k.strides[0], kv.k.strides[1], kv.k.strides[2]};
  c.v = CacheRows{kv.v.data, kv.v.strides[0], kv.v.strides[1], kv.v.strides[2]};

  c.paged = kv.paged();
  if (c.paged) {
    check_view(kv.page_table, "cache.page_table", 2, "[batch, max_pages]", DType::int32);
    check_same_device(kv.page_table, "cache.page_table", c.device);
    c.batch = kv.page_table.shape[0];
    c.num_pages = kv.k.shape[0];
    c.page_size = kv.k.shape[1];
    if (c.page_size < 1)
      fail(Status::invalid_argument, "cache.k: expected page_size = shape[1] >= 1, got 0");
    if (c.block_size % c.page_size != 0)
      fail(Status::invalid_argument, "cache.block_size: " + str(c.block_size) +
                                         " must be a multiple of the page size " +
                                         str(c.page_size) + " (cache.k.shape[1])");
    c.capacity = kv.page_table.shape[1] * c.page_size;
    c.page_table = static_cast<const int32_t*>(kv.page_table.data);
    c.table_seq_stride = kv.page_table.strides[0];
    c.table_page_stride = kv.page_table.strides[1];
  } else {
    c.batch = kv.k.shape[0];
    c.num_pages = c.batch;
    c.capacity = kv.k.shape[1];
    c.page_size = std::max<int64_t>(c.capacity, 1);  // one page per sequence
  }

  check_view(kv.seqlens, "cache.seqlens", 1, "[batch]", DType::int32);
  check_same_device(kv.seqlens, "cache.seqlens", c.device);
  if (kv.seqlens.shape[0] != c.batch)
    fail(Status::invalid_argument,
         "cache.seqlens: expected " + str(c.batch) + " entries (batch" +
             std::string(c.paged ? " = page_table.shape[0]" : " = cache.k.shape[0]") + "), got " +
             str(kv.seqlens.shape[0]));
  c.seqlens = static_cast<int32_t*>(kv.seqlens.data);
  c.seqlens_stride = kv.seqlens.strides[0];

  check_view(kv.block_sums, "cache.block_sums", 4, "[batch, max_blocks, Hkv, D]", DType::float32);
  check_same_device(kv.block_sums, "cache.block_sums", c.device);
  const int64_t blocks = num_blocks(c.capacity, c.block_size);
  if (kv.block_sums.shape[0] != c.batch || kv.block_sums.shape[1] < blocks ||
      kv.block_sums.shape[2] != c.heads_kv || kv.block_sums.shape[3] != c.head_dim)
    fail(Status::invalid_argument, "cache.block_sums: expected shape [" + str(c.batch) +
                                       ", >= " + str(blocks) + ", " + str(c.heads_kv) + ", " +
                                       str(c.head_dim) + "] (max_blocks >= ceil(capacity " +
                                       str(c.capacity) + " / block_size " + str(c.block_size) +
                                       ")), got " + shape_of(kv.block_sums));
  if (kv.block_sums.strides[3] != 1)
    fail(Status::unsupported, "cache.block_sums: the last dimension must be contiguous");
  c.sums = static_cast<float*>(kv.block_sums.data);
  c.sums_seq_stride = kv.block_sums.strides[0];
  c.sums_block_stride = kv.block_sums.strides[1];
  c.sums_head_stride = kv.block_sums.strides[2];

  // Buffers the library writes must not alias anything else of the cache.
  check_no_overlap(kv.k, "cache.k",
                   {{&kv.v, "cache.v"},
                    {&kv.page_table, "cache.page_table"},
                    {&kv.seqlens, "cache.seqlens"},
                    {&kv.block_sums, "cache.block_sums"}});
  check_no_overlap(kv.v, "cache.v",
                   {{&kv.page_table, "cache.page_table"},
                    {&kv.seqlens, "cache.seqlens"},
                    {&kv.block_sums, "cache.block_sums"}});
  check_no_overlap(kv.block_sums, "cache.block_sums",
                   {{&kv.page_table, "cache.page_table"}, {&kv.seqlens, "cache.seqlens"}});
  check_no_overlap(kv.seqlens, "cache.seqlens", {{&kv.page_table, "cache.page_table"}});

  if (c.device.type == DeviceType::cpu) {
    for (int64_t b = 0; b < c.batch; ++b) {
      const int64_t len = c.length(b);
      if (len < 0 || len > c.capacity)
        fail(Status::invalid_argument, "cache.seqlens: entry " + str(b) + " (" + str(len) +
                                           ") outside [0, capacity = " + str(c.capacity) + "]");
    }
  }
  return c;
}

void check_pages(const Cache& c, int64_t seq, int64_t end) {
  if (!c.paged) return;
  for (int64_t page = 0; page * c.page_size < end; ++page) {
    const int64_t entry = c.page_table[seq * c.table_seq_stride + page * c.table_page_stride];
    if (entry < 0 || entry >= c.num_pages)
      fail(Status::invalid_argument, "cache.page_table: entry [" + str(seq) + ", " + str(page) +
                                         "] = " + str(entry) + " is not a page of the pool [0, " +
                                         str(c.num_pages) + ")");
  }
}

Append make_append(const Cache& c, const TensorView& k_new, const TensorView& v_new,
                   const TensorView& cu_seqlens_new) {
  Append a;
  a.k = new_rows(c, k_new, "k_new");
  a.v = new_rows(c, v_new, "v_new");
  if (v_new.shape[0] != k_new.shape[0])
    fail(Status::invalid_argument,
         "v_new: expected " + str(k_new.shape[0]) + " rows like k_new, got " + str(v_new.shape[0]));
  check_same_device(cu_seqlens_new, "cu_seqlens_new", c.device);
  check_cu_view(cu_seqlens_new, "cu_seqlens_new", c.batch);
  a.total = k_new.shape[0];
  a.cu = static_cast<const int32_t*>(cu_seqlens_new.data);
  a.cu_stride = cu_seqlens_new.strides[0];
  // Device values are checked by the device backend (see kv_cache.hpp).
  if (c.device.type != DeviceType::cpu) return a;
  a.begin = read_cu_seqlens(cu_seqlens_new, "cu_seqlens_new", c.batch, a.total);
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t added = a.begin[static_cast<size_t>(b + 1)] - a.begin[static_cast<size_t>(b)];
    if (added == 0) continue;
    const int64_t len = c.length(b);
    if (len + added > c.capacity)
      fail(Status::invalid_argument, "cu_seqlens_new: sequence " + str(b) + " has " + str(len) +
                                         " cached tokens; " + str(added) +
                                         " more exceed the capacity " + str(c.capacity));
    check_pages(c, b, len + added);
  }
  return a;
}

Decode make_decode(const Cache& c, const TensorView& q, const TensorView& cu_seqlens_q,
                   const Config& config) {
  Decode d;
  check_view(q, "q", 3, "[total_q, Hq, D]", c.dtype);
  check_same_device(q, "q", c.device);
  d.total_q = q.shape[0];
  d.heads_q = q.shape[1];
  if (q.shape[2] != c.head_dim)
    fail(Status::invalid_argument,
         "q: head dim " + str(q.shape[2]) + " differs from the cache's " + str(c.head_dim));
  if (d.heads_q < 1 || d.heads_q % c.heads_kv != 0)
    fail(Status::invalid_argument, "q: heads (" + str(d.heads_q) +
                                       ") must be a positive multiple of the cache's kv heads (" +
                                       str(c.heads_kv) + ")");
  if (q.strides[2] != 1) fail(Status::unsupported, "q: the last dimension must be contiguous");
  d.group = d.heads_q / c.heads_kv;
  d.q = Rows{q.data, q.dtype, q.strides[0], q.strides[1]};

  if (config.block_size != c.block_size)
    fail(Status::invalid_argument, "block_size: " + str(config.block_size) +
                                       " differs from cache.block_size " + str(c.block_size) +
                                       " (the block sums are kept per cache block)");
  if (config.top_k < 1)
    fail(Status::invalid_argument, "top_k: expected >= 1, got " + str(config.top_k));
  d.top_k = std::min<int64_t>(config.top_k, int64_t{1} << 31);
  d.softmax_scale = config.softmax_scale.value_or(1.0f / std::sqrt(static_cast<float>(c.head_dim)));
  if (!std::isfinite(d.softmax_scale) || d.softmax_scale <= 0.0f)
    fail(Status::invalid_argument,
         "softmax_scale: expected a finite value > 0, got " + std::to_string(d.softmax_scale));
  d.gqa_shared_routing = config.gqa_shared_routing;

  check_same_device(cu_seqlens_q, "cu_seqlens_q", c.device);
  check_cu_view(cu_seqlens_q, "cu_seqlens_q", c.batch);
  d.cu_q = static_cast<const int32_t*>(cu_seqlens_q.data);
  d.cu_q_stride = cu_seqlens_q.strides[0];
  // Device values are checked by the device backend (see kv_cache.hpp).
  if (c.device.type != DeviceType::cpu) return d;
  d.q_begin = read_cu_seqlens(cu_seqlens_q, "cu_seqlens_q", c.batch, d.total_q);
  d.len_k.resize(static_cast<size_t>(c.batch));
  for (int64_t b = 0; b < c.batch; ++b) {
    const int64_t len = c.length(b);
    if (d.len_q(b) > len)
      fail(Status::invalid_argument,
           "cu_seqlens_q: sequence " + str(b) + " has " + str(d.len_q(b)) + " queries but only " +
               str(len) + " cached tokens; append the queries' keys and values first");
    d.len_k[static_cast<size_t>(b)] = len;
    d.max_len_k = std::max(d.max_len_k, len);
    if (d.len_q(b) > 0) check_pages(c, b, len);
  }
  return d;
}

Problem output_problem(const Cache& c, const Decode& d) {
  Problem p;
  p.total_q = d.total_q;
  p.heads_q = d.heads_q;
  p.heads_kv = c.heads_kv;
  p.head_dim = c.head_dim;
  p.device = c.device;
  return p;
}

}  // namespace moba::core
