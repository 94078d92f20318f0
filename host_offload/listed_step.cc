// One decode step of a listed index (qivf, or exact when a part has no lists), native: for each
// part (a sequence's KV head) probe the lists its query group scores highest, scan their keys
// and the unlisted tail, keep the k best by group logit, and attend over them. The numpy
// references are QueryIVFIndex.search and FlatIndex.search (host_offload.index), then
// RetrievalStore.attend; a Python step costs about 0.6 ms of interpreter work per layer, this
// one a few microseconds. Ties (equal logits) go to the lower row here; numpy's argpartition
// breaks them in no set order. bfloat16 keys are widened to float32 and scored exactly (a
// bfloat16 dot-product shortlist was no faster; README).
//
// Built on first use by host_offload.native (c++ -O3 -march=native -fopenmp).

#include <omp.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
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

// A shuffle of two sixteen-float vectors (GCC before 12 has only __builtin_shuffle).
#if defined(__clang__) || __GNUC__ >= 12
#define SHUFFLE16(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
typedef int32_t m16x __attribute__((vector_size(64)));
#define SHUFFLE16(a, b, ...) __builtin_shuffle(a, b, m16x{__VA_ARGS__})
#endif

// Sixteen sums at once: lane i of the result is the sum of a[i]'s lanes. A halving tree that
// transposes as it adds (30 shuffles and 15 adds, against about 8 instructions a vector one
// by one).
inline f16x sums16(const f16x* a) {
  f16x b[8], c[4], e[2];
#pragma GCC unroll 8
  for (int p = 0; p < 8; ++p)  // halves: lanes 0-7 a[2p]'s, 8-15 a[2p + 1]'s
    b[p] = SHUFFLE16(a[2 * p], a[2 * p + 1], 0, 1, 2, 3, 4, 5, 6, 7,
                     16, 17, 18, 19, 20, 21, 22, 23) +
           SHUFFLE16(a[2 * p], a[2 * p + 1], 8, 9, 10, 11, 12, 13, 14, 15,
                     24, 25, 26, 27, 28, 29, 30, 31);
#pragma GCC unroll 4
  for (int p = 0; p < 4; ++p)  // quarters: four lanes per a
    c[p] = SHUFFLE16(b[2 * p], b[2 * p + 1], 0, 1, 2, 3, 8, 9, 10, 11,
                     16, 17, 18, 19, 24, 25, 26, 27) +
           SHUFFLE16(b[2 * p], b[2 * p + 1], 4, 5, 6, 7, 12, 13, 14, 15,
                     20, 21, 22, 23, 28, 29, 30, 31);
#pragma GCC unroll 2
  for (int p = 0; p < 2; ++p)  // pairs: two lanes per a
    e[p] = SHUFFLE16(c[2 * p], c[2 * p + 1], 0, 1, 4, 5, 8, 9, 12, 13,
                     16, 17, 20, 21, 24, 25, 28, 29) +
           SHUFFLE16(c[2 * p], c[2 * p + 1], 2, 3, 6, 7, 10, 11, 14, 15,
                     18, 19, 22, 23, 26, 27, 30, 31);
  return SHUFFLE16(e[0], e[1], 0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30) +
         SHUFFLE16(e[0], e[1], 1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
}

// The group logit (max over the G queries q[G, d] of q_j . key) of R = 16 / G keys at once:
// each sixteen-lane slice of q is read once for the R keys, and the R x G dot products are
// summed together by sums16. D fixed (0: any multiple of sixteen) so that the loops unroll
// and the accumulators stay in registers.
template <int G, int D, typename T>
inline void block_logits(const float* q, int d, const T* const* keys, float* out) {
  constexpr int R = kLanes / G;
  if constexpr (D > 0) d = D;
  f16x acc[kLanes];
#pragma GCC unroll 16
  for (int a = 0; a < kLanes; ++a) acc[a] = f16x{};
#pragma GCC unroll 8
  for (int i = 0; i < d; i += kLanes) {
    f16x x[R];
#pragma GCC unroll 16
    for (int r = 0; r < R; ++r) x[r] = load16(keys[r] + i);
#pragma GCC unroll 8
    for (int j = 0; j < G; ++j) {
      const f16x qj = load16(q + j * d + i);
#pragma GCC unroll 16
      for (int r = 0; r < R; ++r) acc[r * G + j] += qj * x[r];
    }
  }
  float sums[kLanes];
  const f16x s = sums16(acc);
  std::memcpy(sums, &s, sizeof sums);
#pragma GCC unroll 16
  for (int r = 0; r < R; ++r) {
    float best = sums[r * G];
#pragma GCC unroll 8
    for (int j = 1; j < G; ++j) best = std::max(best, sums[r * G + j]);
    out[r] = best;
  }
}

// Any group size and head dim (the general case, scalar), one key.
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

// Scores keys in blocks: add() keys (a row id and its key), and each full block of
// `block` keys is scored and handed to `consider(row, logit)`; finish() scores the rest.
template <typename T, typename Consider>
class Scorer {
 public:
  Scorer(const float* q, int g, int d, Consider& consider)
      : q_(q), g_(g), d_(d), consider_(consider), block_(g <= 8 && d % kLanes == 0
                                                         ? kLanes / g : 1) {}
  inline void add(int64_t row, const T* key) {
    rows_[fill_] = row;
    keys_[fill_] = key;
    if (++fill_ == block_) flush();
  }
  void finish() {
    if (fill_ == 0) return;
    for (int r = fill_; r < block_; ++r) keys_[r] = keys_[0];  // padding, scores unused
    flush();
  }

 private:
  void flush() {
    float out[kLanes];
    score(out);
    for (int r = 0; r < fill_; ++r) consider_(rows_[r], out[r]);
    fill_ = 0;
  }
  void score(float* out) {
    if (d_ == 128) {
      switch (g_) {
        case 1: return block_logits<1, 128>(q_, d_, keys_, out);
        case 2: return block_logits<2, 128>(q_, d_, keys_, out);
        case 4: return block_logits<4, 128>(q_, d_, keys_, out);
        case 8: return block_logits<8, 128>(q_, d_, keys_, out);
      }
    }
    if (d_ == 64) {
      switch (g_) {
        case 1: return block_logits<1, 64>(q_, d_, keys_, out);
        case 3: return block_logits<3, 64>(q_, d_, keys_, out);
        case 4: return block_logits<4, 64>(q_, d_, keys_, out);
      }
    }
    if (block_ > 1) {
      switch (g_) {
        case 1: return block_logits<1, 0>(q_, d_, keys_, out);
        case 2: return block_logits<2, 0>(q_, d_, keys_, out);
        case 3: return block_logits<3, 0>(q_, d_, keys_, out);
        case 4: return block_logits<4, 0>(q_, d_, keys_, out);
        case 5: return block_logits<5, 0>(q_, d_, keys_, out);
        case 6: return block_logits<6, 0>(q_, d_, keys_, out);
        case 7: return block_logits<7, 0>(q_, d_, keys_, out);
        case 8: return block_logits<8, 0>(q_, d_, keys_, out);
      }
    }
    out[0] = group_logit_any(q_, g_, d_, keys_[0]);
  }

  const float* q_;
  int g_, d_;
  Consider& consider_;
  int block_, fill_ = 0;
  int64_t rows_[kLanes];
  const T* keys_[kLanes];
};

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

// The keys a part's query group reads: the members of the lists whose centroids the group
// scores highest (a share of the last), `spans` of list positions, then the unlisted rows
// [listed, n). Returns the centroids scanned.
int64_t probe(const Part& p, const float* q, int g, int d, double scan,
              std::vector<std::pair<int64_t, int64_t>>& spans) {
  thread_local std::vector<std::pair<float, int64_t>> lists;
  thread_local std::vector<float> centroid;
  spans.clear();
  if (!p.cent_t || p.nlist == 0) return 0;
  int64_t nlist = p.nlist;
  double want = scan * static_cast<double>(nlist);
  int64_t nprobe = std::max<int64_t>(
      1, std::min<int64_t>(nlist, static_cast<int64_t>(std::ceil(want - 1e-9))));
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
  for (int64_t i = 0; i < nprobe; ++i) {
    int64_t c = lists[i].second;
    int64_t begin = p.offsets[c], len = p.fill[c];
    if (i == nprobe - 1)  // the last list: its head, a share `last` of it
      len = std::min(len, std::max<int64_t>(1, static_cast<int64_t>(std::ceil(last * len))));
    spans.emplace_back(begin, begin + len);
  }
  return nlist;
}

// The best k of a stream of (logit, -row) entries (ties go to the lower row): entries above
// a floor gather in a buffer, and when it holds 4k the best k are kept and the k-th becomes
// the floor; about one comparison an entry, where a heap of k moves log k entries for each
// that enters it.
class TopK {
 public:
  void reset(int k) {
    k_ = k;
    buf_.clear();
    floor_ = {-INFINITY, std::numeric_limits<int64_t>::min()};
  }
  inline void add(int64_t row, float logit) {
    const std::pair<float, int64_t> entry{logit, -row};
    if (entry > floor_) {
      buf_.push_back(entry);
      if (buf_.size() >= 4 * static_cast<size_t>(k_)) keep();
    }
  }
  // The best k (or all, if fewer), in no order.
  std::vector<std::pair<float, int64_t>>& best() {
    if (buf_.size() > static_cast<size_t>(k_)) keep();
    return buf_;
  }

 private:
  void keep() {
    std::nth_element(buf_.begin(), buf_.begin() + (k_ - 1), buf_.end(), std::greater<>());
    floor_ = buf_[k_ - 1];
    buf_.resize(k_);
  }
  int k_ = 1;
  std::vector<std::pair<float, int64_t>> buf_;
  std::pair<float, int64_t> floor_;
};

// Keys ahead of the scan whose cache lines are asked for early (0: none); a build flag, so
// that hosts can be compared (-DLONGCTX_PREFETCH=N).
#ifndef LONGCTX_PREFETCH
#define LONGCTX_PREFETCH 8
#endif
constexpr int64_t kPrefetch = LONGCTX_PREFETCH;

// Entries [from, to) of a part's reading order (its spans' list positions, then its unlisted
// rows) scored into `top`, the best k; returns the keys scored. A key several probed lists
// hold is scored once: the first slice to set its bit in `seen` (one bit a row, small enough
// to stay in the L1 cache) takes it, by an atomic OR when slices run at once (`shared`).
template <typename T>
int64_t score_slice(const Part& p, const std::vector<std::pair<int64_t, int64_t>>& spans,
                    int64_t from, int64_t to, uint64_t* seen, bool shared, const float* q,
                    int g, int d, int k, TopK& top) {
  top.reset(k);
  int64_t scored = 0;
  auto consider = [&](int64_t r, float s) { top.add(r, s); };
  Scorer<T, decltype(consider)> scorer(q, g, d, consider);
  const T* list_keys = static_cast<const T*>(p.list_keys);
  int64_t at = 0;  // entries before the current span
  for (const auto& [begin, end] : spans) {
    int64_t lo = std::max(begin, begin + from - at), hi = std::min(end, begin + to - at);
    at += end - begin;
    for (int64_t m = lo; m < hi; ++m) {  // the list's keys, stored in list order
      if (kPrefetch > 0 && m + kPrefetch < hi) {  // ahead of the hardware's own prefetch
        const char* ahead = reinterpret_cast<const char*>(list_keys + (m + kPrefetch) * d);
        for (int64_t at = 0; at < d * static_cast<int64_t>(sizeof(T)); at += 64)
          __builtin_prefetch(ahead + at);
      }
      int64_t r = p.ids[m];
      uint64_t bit = uint64_t{1} << (r & 63);
      uint64_t was = shared ? __atomic_fetch_or(&seen[r >> 6], bit, __ATOMIC_RELAXED)
                            : std::exchange(seen[r >> 6], seen[r >> 6] | bit);
      if (was & bit) continue;
      ++scored;
      scorer.add(r, list_keys + m * d);
    }
  }
  const T* keys = static_cast<const T*>(p.keys);
  int64_t listed = p.cent_t ? p.listed : 0;
  for (int64_t r = listed + std::max<int64_t>(from - at, 0);
       r < std::min(p.n, listed + to - at); ++r) {
    ++scored;
    scorer.add(r, keys + r * d);
  }
  scorer.finish();
  return scored;
}

// Attention of the group's queries q [g, d] over `found` rows: o [g, d], lse [g].
void attend(const Part& p, const float* q, int g, int d, int bf16, float scale,
            const int64_t* found_rows, int found, float* o, float* lse) {
  thread_local std::vector<float> logits, keyrows, row;
  logits.resize(static_cast<size_t>(g) * std::max(found, 1));
  keyrows.resize(static_cast<size_t>(std::max(found, 1)) * d);
  row.resize(d);
  for (int i = 0; i < found; ++i) load_row(p.keys, found_rows[i], d, bf16, &keyrows[i * d]);
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
    load_row(p.values, found_rows[i], d, bf16, row.data());
    for (int j = 0; j < g; ++j) {
      float* oj = o + static_cast<int64_t>(j) * d;
      const float w = logits[j * found + i];
#pragma omp simd
      for (int t = 0; t < d; ++t) oj[t] += w * row[t];
    }
  }
}

}  // namespace

extern "C" {

// parts: number of (sequence, KV head) parts; per part arrays of pointers and sizes (values
// null: ids only); q [parts, g, d] float32; outputs o [parts, g, d], lse [parts, g] (with
// values), rows [parts, k], scanned [parts], seconds [parts, 2] (search, attention: a part's
// own, summed over the threads it ran on). threads: OpenMP threads (0: all); min_slice: the
// fewest candidates worth a thread of their own.
//
// In three passes over one team: each part probes its lists; then slices of the keys they
// hold are scored, so that a step of fewer parts than threads (8 KV heads, 32 cores) still
// uses every thread; then each part merges its slices' best and attends.
void listed_step(int parts, int g, int d, int k, int bf16, double scan, float scale,
                 int threads, int64_t min_slice, const float* q, const void* const* keys,
                 const void* const* values, const float* const* cent_t,
                 const int64_t* const* offsets, const int64_t* const* fill,
                 const int64_t* const* ids,
                 const void* const* list_keys, const int64_t* nlist, const int64_t* listed,
                 const int64_t* n, float* o,
                 float* lse, int64_t* rows, int64_t* scanned, double* seconds) {
  const int most = threads > 0 ? threads : omp_get_max_threads();
  int64_t stored = 0;  // a bound on the candidates: no more threads than parts or slices
  for (int i = 0; i < parts; ++i) stored += n[i];
  min_slice = std::max<int64_t>(1, min_slice);
  const int team = static_cast<int>(
      std::clamp<int64_t>(std::max<int64_t>(parts, stored / min_slice), 1, std::max(most, 1)));
  // The calling thread's buffers, kept between calls (the team shares them by reference).
  thread_local std::vector<std::vector<std::pair<int64_t, int64_t>>> span_buffers;
  thread_local std::vector<std::vector<uint64_t>> seen_buffers;
  thread_local std::vector<TopK> best_buffers;
  thread_local std::vector<int64_t> entry_buffer;
  thread_local std::vector<int> slice_buffer, first_buffer;
  auto& spans = span_buffers;
  auto& seen = seen_buffers;
  auto& best = best_buffers;
  auto& entries = entry_buffer;  // per part: list entries to read, then unlisted rows
  auto& slices = slice_buffer;   // per part; slice s of part i is task first[i] + s
  auto& first = first_buffer;
  spans.resize(parts);
  seen.resize(parts);
  entries.assign(parts, 0);
  slices.assign(parts, 1);
  first.resize(parts + 1);
  auto part = [&](int i) {
    return Part{keys[i], values ? values[i] : nullptr, cent_t ? cent_t[i] : nullptr,
                offsets ? offsets[i] : nullptr, fill ? fill[i] : nullptr,
                ids ? ids[i] : nullptr, list_keys ? list_keys[i] : nullptr,
                nlist[i], listed[i], n[i]};
  };
  const int split = std::max(1, (team + parts - 1) / std::max(parts, 1));
#pragma omp parallel num_threads(team) if (team > 1)
  {
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < parts; ++i) {
      double t0 = now();
      const Part p = part(i);
      scanned[i] = probe(p, q + static_cast<int64_t>(i) * g * d, g, d, scan, spans[i]);
      for (const auto& [begin, end] : spans[i]) entries[i] += end - begin;
      entries[i] += p.n - (p.cent_t ? p.listed : 0);
      seen[i].assign(spans[i].empty() ? 0 : (p.n + 63) / 64, 0);
      slices[i] = static_cast<int>(std::clamp<int64_t>(entries[i] / min_slice, 1, split));
      seconds[2 * i] = now() - t0;
      seconds[2 * i + 1] = 0.0;
    }
#pragma omp single
    {
      first[0] = 0;
      for (int i = 0; i < parts; ++i) first[i + 1] = first[i] + slices[i];
      best.resize(first[parts]);
    }
#pragma omp for schedule(dynamic, 1)
    for (int t = 0; t < first[parts]; ++t) {
      int i = static_cast<int>(std::upper_bound(first.begin(), first.begin() + parts + 1, t) -
                               first.begin()) - 1;
      int s = t - first[i];
      double t0 = now();
      int64_t from = entries[i] * s / slices[i], to = entries[i] * (s + 1) / slices[i];
      const float* qi = q + static_cast<int64_t>(i) * g * d;
      const bool shared = slices[i] > 1;
      int64_t scored =
          bf16 ? score_slice<uint16_t>(part(i), spans[i], from, to, seen[i].data(), shared, qi,
                                       g, d, k, best[t])
               : score_slice<float>(part(i), spans[i], from, to, seen[i].data(), shared, qi, g,
                                    d, k, best[t]);
      double dt = now() - t0;
#pragma omp atomic
      scanned[i] += scored;
#pragma omp atomic
      seconds[2 * i] += dt;
    }
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < parts; ++i) {
      double t0 = now();
      thread_local std::vector<std::pair<float, int64_t>> merged;
      merged.clear();
      for (int t = first[i]; t < first[i + 1]; ++t) {
        const auto& slice = best[t].best();
        merged.insert(merged.end(), slice.begin(), slice.end());
      }
      // Best first; ties by row (entries hold -row). Slices share no row.
      auto order = [](const auto& a, const auto& b) {
        return a.first > b.first || (a.first == b.first && a.second > b.second);
      };
      int found = static_cast<int>(std::min<size_t>(merged.size(), k));
      std::partial_sort(merged.begin(), merged.begin() + found, merged.end(), order);
      int64_t* out = rows + static_cast<int64_t>(i) * k;
      for (int j = 0; j < k; ++j) out[j] = j < found ? -merged[j].second : -1;
      double t1 = now();
      seconds[2 * i] += t1 - t0;
      if (o) {  // with values: attention over the found rows
        attend(part(i), q + static_cast<int64_t>(i) * g * d, g, d, bf16, scale, out, found,
               o + static_cast<int64_t>(i) * g * d, lse + static_cast<int64_t>(i) * g);
        seconds[2 * i + 1] = now() - t1;
      }
    }
  }
}

}  // extern "C"
