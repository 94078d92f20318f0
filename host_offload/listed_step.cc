// One decode step of a listed index (qivf, or exact when a part has no lists), native: for each
// part (a sequence's KV head) probe the lists its query group scores highest, scan their keys
// and the unlisted tail, keep the k best by group logit, and attend over them. The numpy
// references are QueryIVFIndex.search and FlatIndex.search (host_offload.index), then
// RetrievalStore.attend; a Python step costs about 0.6 ms of interpreter work per layer, this
// one a few microseconds. Ties (equal logits) go to the lower row here; numpy's argpartition
// breaks them in no set order.
//
// Built on first use by host_offload.native (c++ -O3 -march=native -fopenmp).

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

namespace {

inline float bf16_to_f32(uint16_t x) {
  uint32_t bits = static_cast<uint32_t>(x) << 16;
  float out;
  std::memcpy(&out, &bits, sizeof out);
  return out;
}

// Row `r` of a part's keys or values as float32 into `out[d]`.
inline void load_row(const void* base, int64_t r, int d, int bf16, float* out) {
  if (bf16) {
    const uint16_t* row = static_cast<const uint16_t*>(base) + r * d;
#pragma omp simd
    for (int i = 0; i < d; ++i) out[i] = bf16_to_f32(row[i]);
  } else {
    std::memcpy(out, static_cast<const float*>(base) + r * d, sizeof(float) * d);
  }
}

// Sixteen floats: the compiler maps it onto the host's vector registers (one AVX-512
// register, two AVX2 ones, ...).
typedef float f16x __attribute__((vector_size(64)));
typedef uint16_t u16x __attribute__((vector_size(32)));
typedef uint32_t u32x __attribute__((vector_size(64)));
constexpr int kLanes = 16;

inline f16x load16(const float* x) {
  f16x v;
  std::memcpy(&v, x, sizeof v);
  return v;
}

inline f16x load16(const uint16_t* x) {  // bfloat16: the high half of a float32
  u16x h;
  std::memcpy(&h, x, sizeof h);
  u32x w = __builtin_convertvector(h, u32x) << 16;
  f16x v;
  std::memcpy(&v, &w, sizeof v);
  return v;
}

typedef float f8x __attribute__((vector_size(32)));
typedef float f4x __attribute__((vector_size(16)));

inline float sum16(f16x v) {  // halving: two vector adds, then four lanes
  f8x lo, hi;
  std::memcpy(&lo, &v, sizeof lo);
  std::memcpy(&hi, reinterpret_cast<const char*>(&v) + sizeof lo, sizeof hi);
  f8x h = lo + hi;
  f4x a, b;
  std::memcpy(&a, &h, sizeof a);
  std::memcpy(&b, reinterpret_cast<const char*>(&h) + sizeof a, sizeof b);
  f4x f = a + b;
  return (f[0] + f[2]) + (f[1] + f[3]);
}

// max over the group's G queries q[G, d] of q_j . key: the key is read once for all G
// queries, sixteen lanes at a time, into G accumulators held in registers.
template <int G, typename T>
inline float group_logit_fixed(const float* q, int d, const T* key) {
  f16x acc[G];
  for (int j = 0; j < G; ++j) acc[j] = f16x{};
  for (int i = 0; i < d; i += kLanes) {
    f16x x = load16(key + i);
    for (int j = 0; j < G; ++j) acc[j] += load16(q + j * d + i) * x;
  }
  float best = -INFINITY;
  for (int j = 0; j < G; ++j) best = std::max(best, sum16(acc[j]));
  return best;
}

// Any group size and head dim (the general case, scalar).
template <typename T>
inline float group_logit_any(const float* q, int g, int d, const T* key) {
  float best = -INFINITY;
  for (int j = 0; j < g; ++j) {
    float acc = 0.f;
    for (int i = 0; i < d; ++i) {
      float x;
      if constexpr (sizeof(T) == 2) x = bf16_to_f32(key[i]); else x = key[i];
      acc += q[j * d + i] * x;
    }
    best = std::max(best, acc);
  }
  return best;
}

template <typename T>
inline float group_logit_rows(const float* q, int g, int d, const T* key) {
  if (d % kLanes == 0) {
    switch (g) {
      case 1: return group_logit_fixed<1>(q, d, key);
      case 2: return group_logit_fixed<2>(q, d, key);
      case 3: return group_logit_fixed<3>(q, d, key);
      case 4: return group_logit_fixed<4>(q, d, key);
      case 5: return group_logit_fixed<5>(q, d, key);
      case 6: return group_logit_fixed<6>(q, d, key);
      case 7: return group_logit_fixed<7>(q, d, key);
      case 8: return group_logit_fixed<8>(q, d, key);
    }
  }
  return group_logit_any(q, g, d, key);
}

inline float group_logit(const float* q, int g, int d, const void* keys, int64_t r, int bf16) {
  if (bf16) return group_logit_rows(q, g, d, static_cast<const uint16_t*>(keys) + r * d);
  return group_logit_rows(q, g, d, static_cast<const float*>(keys) + r * d);
}

struct Part {
  const void* keys;        // [cap, d] rows, float32 or bfloat16
  const void* values;      // [cap, d]; null for ids only, or a part with no rows
  const float* cent_t;     // [d, nlist] or null (no lists: every row is scanned)
  const int64_t* offsets;  // [nlist + 1] into ids: where each list starts (and its room ends)
  const int64_t* fill;     // [nlist]: the ids each list holds
  const int64_t* ids;      // list members, most-ranked first within a list
  const void* list_keys;   // [total, d]: the members' keys, in the same order
  int64_t nlist, listed, n;
};

double now() {
  return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

// A part's step: returns the keys scanned (centroids included); seconds[0, 1]: the search's
// and the attention's.
int64_t part_step(const Part& p, const float* q, int g, int d, int k, int bf16, double scan,
                  float scale, float* o, float* lse, int64_t* rows_out, double* seconds) {
  double t0 = now();
  thread_local std::vector<uint32_t> stamp;
  thread_local uint32_t epoch = 0;
  thread_local std::vector<float> row;
  thread_local std::vector<std::pair<float, int64_t>> heap;  // min-heap of (logit, row)
  thread_local std::vector<std::pair<float, int64_t>> lists;
  thread_local std::vector<float> centroid;
  row.resize(d);
  heap.clear();
  int64_t scanned = 0;
  auto consider = [&](int64_t r, float s) {
    ++scanned;
    if (static_cast<int>(heap.size()) < k) {
      heap.emplace_back(s, -r);
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    } else if (s > heap.front().first || (s == heap.front().first && -r > heap.front().second)) {
      std::pop_heap(heap.begin(), heap.end(), std::greater<>());
      heap.back() = {s, -r};
      std::push_heap(heap.begin(), heap.end(), std::greater<>());
    }
  };
  int64_t listed = p.cent_t ? p.listed : 0;
  if (p.cent_t && p.nlist > 0) {
    // Probe: the group's logit with each centroid; the best lists, a fractional last one.
    int64_t nlist = p.nlist;
    double want = scan * static_cast<double>(nlist);
    int64_t nprobe = std::max<int64_t>(1, std::min<int64_t>(nlist, static_cast<int64_t>(
                                                                       std::ceil(want - 1e-9))));
    double last = want - static_cast<double>(nprobe - 1);
    lists.resize(nlist);
    centroid.resize(nlist);
    for (int64_t c = 0; c < nlist; ++c) lists[c] = {-INFINITY, c};
    for (int j = 0; j < g; ++j) {  // row by row of the transposed centroids: contiguous
      const float* qj = q + static_cast<int64_t>(j) * d;
      float* acc = centroid.data();
      std::fill(acc, acc + nlist, 0.f);
      for (int i = 0; i < d; ++i) {
        const float qi = qj[i];
        const float* row = p.cent_t + static_cast<int64_t>(i) * nlist;
#pragma omp simd
        for (int64_t c = 0; c < nlist; ++c) acc[c] += qi * row[c];
      }
      for (int64_t c = 0; c < nlist; ++c) lists[c].first = std::max(lists[c].first, acc[c]);
    }
    // best first; ties by list id (as a stable sort of the negated logits)
    auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    std::partial_sort(lists.begin(), lists.begin() + nprobe, lists.end(), better);
    if (stamp.size() < static_cast<size_t>(p.n)) stamp.assign(p.n, 0), epoch = 0;
    if (++epoch == 0) std::fill(stamp.begin(), stamp.end(), 0), epoch = 1;
    for (int64_t i = 0; i < nprobe; ++i) {
      int64_t c = lists[i].second;
      int64_t begin = p.offsets[c], len = p.fill[c];
      if (i == nprobe - 1)  // the last list: its head, a share `last` of it
        len = std::min(len, std::max<int64_t>(1, static_cast<int64_t>(std::ceil(last * len))));
      int64_t end = begin + len;
      for (int64_t m = begin; m < end; ++m) {  // the list's keys, stored in list order
        int64_t r = p.ids[m];
        if (stamp[r] == epoch) continue;  // a key listed by several probed clusters: once
        stamp[r] = epoch;
        consider(r, group_logit(q, g, d, p.list_keys, m, bf16));
      }
    }
    scanned += nlist;
  }
  for (int64_t r = listed; r < p.n; ++r) consider(r, group_logit(q, g, d, p.keys, r, bf16));
  // Best first; ties by row (heap holds -row).
  std::sort(heap.begin(), heap.end(), [](const auto& a, const auto& b) {
    return a.first > b.first || (a.first == b.first && a.second > b.second);
  });
  int found = static_cast<int>(heap.size());
  for (int i = 0; i < k; ++i) rows_out[i] = i < found ? -heap[i].second : -1;
  double t1 = now();
  seconds[0] = t1 - t0;
  seconds[1] = 0.0;
  if (!o) return scanned;  // ids only
  // Attention of each query over the found rows: o [g, d], lse [g].
  thread_local std::vector<float> logits, keyrows;
  logits.resize(static_cast<size_t>(g) * std::max(found, 1));
  keyrows.resize(static_cast<size_t>(std::max(found, 1)) * d);
  for (int i = 0; i < found; ++i) load_row(p.keys, -heap[i].second, d, bf16, &keyrows[i * d]);
  for (int j = 0; j < g; ++j) {
    const float* qj = q + static_cast<int64_t>(j) * d;
    float* oj = o + static_cast<int64_t>(j) * d;
    std::fill(oj, oj + d, 0.f);
    if (found == 0) {
      lse[j] = -INFINITY;
      continue;
    }
    float top = -INFINITY;
    for (int i = 0; i < found; ++i) {
      const float* x = &keyrows[i * d];
      float acc = 0.f;
#pragma omp simd reduction(+ : acc)
      for (int t = 0; t < d; ++t) acc += (qj[t] * scale) * x[t];
      logits[j * found + i] = acc;
      top = std::max(top, acc);
    }
    float total = 0.f;
    for (int i = 0; i < found; ++i) {
      float w = std::exp(logits[j * found + i] - top);
      logits[j * found + i] = w;
      total += w;
    }
    for (int i = 0; i < found; ++i) logits[j * found + i] /= total;
    lse[j] = std::log(total) + top;
  }
  for (int i = 0; i < found; ++i) {  // each value row read once for the group
    load_row(p.values, -heap[i].second, d, bf16, row.data());
    for (int j = 0; j < g; ++j) {
      float* oj = o + static_cast<int64_t>(j) * d;
      const float w = logits[j * found + i];
#pragma omp simd
      for (int t = 0; t < d; ++t) oj[t] += w * row[t];
    }
  }
  seconds[1] = now() - t1;
  return scanned;
}

}  // namespace

extern "C" {

// parts: number of (sequence, KV head) parts; per part arrays of pointers and sizes (values
// null: ids only); q [parts, g, d] float32; outputs o [parts, g, d], lse [parts, g] (with
// values), rows [parts, k], scanned [parts], seconds [parts, 2]. threads: OpenMP threads.
void listed_step(int parts, int g, int d, int k, int bf16, double scan, float scale,
                 int threads, const float* q, const void* const* keys,
                 const void* const* values, const float* const* cent_t,
                 const int64_t* const* offsets, const int64_t* const* fill,
                 const int64_t* const* ids,
                 const void* const* list_keys, const int64_t* nlist, const int64_t* listed,
                 const int64_t* n, float* o,
                 float* lse, int64_t* rows, int64_t* scanned, double* seconds) {
  int team = std::max(1, std::min(threads > 0 ? threads : omp_get_max_threads(), parts));
#pragma omp parallel for schedule(dynamic, 1) num_threads(team) if (team > 1)
  for (int i = 0; i < parts; ++i) {
    Part p{keys[i], values ? values[i] : nullptr, cent_t ? cent_t[i] : nullptr,
           offsets ? offsets[i] : nullptr, fill ? fill[i] : nullptr, ids ? ids[i] : nullptr,
           list_keys ? list_keys[i] : nullptr,
           nlist[i], listed[i], n[i]};
    scanned[i] = part_step(p, q + static_cast<int64_t>(i) * g * d, g, d, k, bf16, scan, scale,
                           o ? o + static_cast<int64_t>(i) * g * d : nullptr,
                           lse ? lse + static_cast<int64_t>(i) * g : nullptr,
                           rows + static_cast<int64_t>(i) * k, seconds + 2 * i);
  }
}

}  // extern "C"
