// Attention over a request's own KV blocks plus borrowed segments (kvdedup shared mode).
//
// The KV cache is vLLM 0.32's CPU layout, one tensor per layer
// [num_blocks, kv_heads, block_size, 2 * head_dim]: per (block, kv head) a tile whose
// first half holds the keys transposed ([head_dim][block_size], as the "vec"/"vec16"
// ISAs write them) and whose second half holds the values ([block_size][head_dim]).
// vllm_ext/kernels.py checks this layout against the backend's own write op at start-up.
//
// A borrowed segment is a run of a reader's logical positions [dst, dst + len) whose keys
// and values sit in another request's slots: source positions [src, src + len) of a
// source block list. Keys were rotated (RoPE, neox pairs) at their source positions; the
// reader uses them at src + delta. Instead of re-rotating keys, the query is rotated by
// -delta for that segment, which gives the same score <R(p) q, R(s + delta) k> =
// <R(p - delta) q, R(s) k>; all parts are merged by one online softmax.
//
// Rows are independent work: (row, kv head, query tile). float32 accumulation; exp is a
// degree-6 polynomial (relative error < 2e-7) on GCC vectors of VL float lanes: 16
// (AVX-512) where the compiler targets it, else 8 (AVX2).
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

constexpr int QTILE = 16;  // query tokens per work item
constexpr int MAXG = 8;    // query heads per KV head (at most), and rows per pass
constexpr int GROUP = 4;   // spans per online-softmax update

#if defined(__AVX512F__)
constexpr int VL = 16;
#else
constexpr int VL = 8;
#endif
constexpr int NK = 32 / VL;  // vectors per 32 keys of a key row
constexpr int NV = 64 / VL;  // vectors per 64 dims of a value row
typedef float vf __attribute__((vector_size(VL * 4)));
typedef int32_t vi __attribute__((vector_size(VL * 4)));
typedef uint16_t vh __attribute__((vector_size(VL * 2)));

// `n` keys at slot offsets [off, off + n) of physical block `block`; the first is at
// the reader's logical position `pos`. `seg` is -1 for the reader's own blocks.
struct Span {
  int32_t block, off, n, pos, seg;
};

inline float to_float(float v) { return v; }
inline float to_float(c10::BFloat16 v) { return static_cast<float>(v); }
inline float to_float(c10::Half v) { return static_cast<float>(v); }

inline vf loadv(const float* p) {
  vf v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline vf loadv(const c10::BFloat16* p) {  // bf16 is the top half of a float
  vh h;
  std::memcpy(&h, p, sizeof h);
  return (vf)(__builtin_convertvector(h, vi) << 16);
}
inline vf loadv(const c10::Half* p) {
  vf v;
  for (int j = 0; j < VL; ++j) v[j] = static_cast<float>(p[j]);
  return v;
}
inline void storev(float* p, vf v) { std::memcpy(p, &v, sizeof v); }

// exp(x) for x <= 0 (lanes at -inf give exactly 0): 2^k * e^r, |r| <= ln2 / 2, with a
// degree-6 Taylor polynomial (relative error < 2e-7).
inline vf expv(vf x) {
  const vf magic = vf{} + 12582912.0f;  // 1.5 * 2^23: adding it rounds to an integer
  const vi dead = x == -INFINITY;
  x = x < -87.0f ? vf{} - 87.0f : x;
  const vf t = x * 1.4426950408889634f + magic;
  const vf k = t - magic;
  const vi ki = (vi)t - (vi)magic;
  const vf r = x - k * 0.693145751953125f - k * 1.428606765330187e-06f;
  vf p = vf{} + 1.0f / 720.0f;
  p = p * r + 1.0f / 120.0f;
  p = p * r + 1.0f / 24.0f;
  p = p * r + 1.0f / 6.0f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const vf scale = (vf)((ki + 127) << 23);
  return (vf)((vi)(p * scale) & ~dead);
}

// The spans a row reads, in position order, covering [0, seq_len).
std::vector<Span> row_spans(int seq_len, int B, const int32_t* table, const int32_t* segs,
                            int n_segs, const int32_t* src_blocks) {
  std::vector<Span> out;
  int p = 0, s = 0;
  while (p < seq_len) {
    while (s < n_segs && segs[s * 5] + segs[s * 5 + 1] <= p) ++s;
    const int seg_start = s < n_segs ? segs[s * 5] : seq_len;
    if (s < n_segs && p >= seg_start) {
      const int32_t* g = segs + s * 5;  // dst, len, delta, src, src_tab
      const int end = std::min(g[0] + g[1], seq_len);
      const int first_blk = g[3] / B;
      while (p < end) {
        const int sp = g[3] + (p - g[0]);
        const int off = sp % B;
        const int n = std::min(B - off, end - p);
        out.push_back({src_blocks[g[4] + sp / B - first_blk], off, n, p, s});
        p += n;
      }
    } else {
      const int off = p % B;
      const int n = std::min({B - off, seg_start - p, seq_len - p});
      out.push_back({table[p / B], off, n, p, -1});
      p += n;
    }
  }
  return out;
}

// row_spans for every row of `rows` ([R, 4] = q_start, q_len, seq_len, table row).
std::vector<std::vector<Span>> all_row_spans(const torch::Tensor& rows, int B,
                                             const torch::Tensor& block_table,
                                             const torch::Tensor& seg_ptr,
                                             const torch::Tensor& segs,
                                             const torch::Tensor& src_blocks) {
  const int32_t* rw = rows.data_ptr<int32_t>();
  const int32_t* sp = seg_ptr.data_ptr<int32_t>();
  const int32_t* sg = segs.numel() ? segs.data_ptr<int32_t>() : nullptr;
  const int32_t* sb = src_blocks.numel() ? src_blocks.data_ptr<int32_t>() : nullptr;
  const int32_t* bt = block_table.data_ptr<int32_t>();
  std::vector<std::vector<Span>> spans(rows.size(0));
  for (int r = 0; r < rows.size(0); ++r) {
    const int32_t* x = rw + r * 4;
    spans[r] = row_spans(x[2], B, bt + x[3] * block_table.stride(0),
                         sg ? sg + sp[r] * 5 : nullptr, sp[r + 1] - sp[r], sb);
  }
  return spans;
}

// cs[0, half) = cos(delta * inv_freq), cs[half, 2 * half) = sin(delta * inv_freq).
inline void rotation_of(double delta, const double* inv_freq, int half, float* cs) {
  for (int i = 0; i < half; ++i) {
    cs[i] = static_cast<float>(std::cos(delta * inv_freq[i]));
    cs[half + i] = static_cast<float>(std::sin(delta * inv_freq[i]));
  }
}

struct Shape {
  int B, D, Hq, Hkv, G;
  float scale;
};

// Scores of the 32 keys at slots [c0, c0 + 32) of a key tile (transposed: row d holds
// dim d of every slot, stride B) for HG query heads at once: each key row is loaded
// once for all heads, and NK * HG independent accumulators keep the FMA units busy.
template <typename T, int HG, bool PF = false>
inline void scores32(const float* const* q, const T* ktile, int B, int D, int c0,
                     float* const* out, const T* pf) {
  vf s[HG][NK];
#pragma GCC unroll 4
  for (int h = 0; h < HG; ++h)
#pragma GCC unroll 4
    for (int j = 0; j < NK; ++j) s[h][j] = vf{};
  const T* k = ktile + c0;
  for (int d = 0; d < D; ++d, k += B) {
    if constexpr (PF) {  // the same key columns of the next tile: 32 keys span 128 bytes or less
      __builtin_prefetch(pf + static_cast<int64_t>(d) * B + c0);
      __builtin_prefetch(pf + static_cast<int64_t>(d) * B + c0 + 16);
    }
    vf kj[NK];
#pragma GCC unroll 4
    for (int j = 0; j < NK; ++j) kj[j] = loadv(k + VL * j);
#pragma GCC unroll 4
    for (int h = 0; h < HG; ++h) {
      const float qd = q[h][d];
#pragma GCC unroll 4
      for (int j = 0; j < NK; ++j) s[h][j] += qd * kj[j];
    }
  }
#pragma GCC unroll 4
  for (int h = 0; h < HG; ++h)
#pragma GCC unroll 4
    for (int j = 0; j < NK; ++j) storev(out[h] + c0 + VL * j, s[h][j]);
}

// acc[h][0..64) = alpha[h] * acc[h] + sum_t w[h][t] * V[t][ds..ds+64) for HG heads at
// once (each value row loaded once, NV * HG independent accumulators).
template <typename T, int HG, bool PF = false>
inline void values64(float* const* acc, const float* alpha, const float* const* w,
                     const T* vtile, int D, int ds, int lo, int last, const T* pf) {
  vf a[HG][NV];
#pragma GCC unroll 4
  for (int h = 0; h < HG; ++h)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) a[h][j] = loadv(acc[h] + ds + VL * j) * alpha[h];
  for (int t = lo; t < last; ++t) {
    const T* v = vtile + static_cast<int64_t>(t) * D + ds;
    if constexpr (PF) {  // value row t of the next tile, these 64 dims (256 bytes or less)
      const T* n = pf + static_cast<int64_t>(t) * D + ds;
      for (int c = 0; c < 64; c += 16) __builtin_prefetch(n + c);
    }
    vf vj[NV];
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) vj[j] = loadv(v + VL * j);
#pragma GCC unroll 4
    for (int h = 0; h < HG; ++h) {
      const float p = w[h][t];
#pragma GCC unroll 8
      for (int j = 0; j < NV; ++j) a[h][j] += p * vj[j];
    }
  }
#pragma GCC unroll 4
  for (int h = 0; h < HG; ++h)
#pragma GCC unroll 8
    for (int j = 0; j < NV; ++j) storev(acc[h] + ds + VL * j, a[h][j]);
}

// The first head group prefetches the next tile (`pf`, nullable); a compile-time flag, so
// calls without one carry no test in their inner loop.
template <typename T, int HG>
inline void scores32p(const float* const* q, const T* ktile, int B, int D, int c0,
                      float* const* out, const T* pf) {
  if (pf) return scores32<T, HG, true>(q, ktile, B, D, c0, out, pf);
  scores32<T, HG, false>(q, ktile, B, D, c0, out, nullptr);
}

template <typename T>
void scores_all(const float* const* q, const T* ktile, int B, int D, int c0, int G,
                float* const* out, const T* pf) {
  int h = 0;
  if constexpr (VL == 16)  // 16 accumulators + 2 key vectors fit AVX-512's 32 registers
    for (; h + 8 <= G; h += 8, pf = nullptr)
      scores32p<T, 8>(q + h, ktile, B, D, c0, out + h, pf);
  for (; h + 4 <= G; h += 4, pf = nullptr) scores32p<T, 4>(q + h, ktile, B, D, c0, out + h, pf);
  switch (G - h) {
    case 3: return scores32p<T, 3>(q + h, ktile, B, D, c0, out + h, pf);
    case 2: return scores32p<T, 2>(q + h, ktile, B, D, c0, out + h, pf);
    case 1: return scores32p<T, 1>(q + h, ktile, B, D, c0, out + h, pf);
    default: return;
  }
}

template <typename T, int HG>
inline void values64p(float* const* acc, const float* alpha, const float* const* w,
                      const T* vtile, int D, int ds, int lo, int last, const T* pf) {
  if (pf) return values64<T, HG, true>(acc, alpha, w, vtile, D, ds, lo, last, pf);
  values64<T, HG, false>(acc, alpha, w, vtile, D, ds, lo, last, nullptr);
}

// `pf` (nullable): the next tile's values, prefetched while these are read
template <typename T>
void values_all(float* const* acc, const float* alpha, const float* const* w,
                const T* vtile, int D, int lo, int last, int G, const T* pf) {
  // heads per pass: as many as the vector registers hold (AVX-512: 32, AVX2: 16)
  constexpr int HV = VL == 16 ? 4 : 2;
  for (int ds = 0; ds < D; ds += 64) {
    int h = 0;
    const T* p = pf;
    for (; h + HV <= G; h += HV, p = nullptr)
      values64p<T, HV>(acc + h, alpha + h, w + h, vtile, D, ds, lo, last, p);
    switch (G - h) {
      case 3: values64p<T, 3>(acc + h, alpha + h, w + h, vtile, D, ds, lo, last, p); break;
      case 2: values64p<T, 2>(acc + h, alpha + h, w + h, vtile, D, ds, lo, last, p); break;
      case 1: values64p<T, 1>(acc + h, alpha + h, w + h, vtile, D, ds, lo, last, p); break;
      default: break;
    }
  }
}

// One work item: queries [q0, q1) of a row, the G query heads of KV head g.
// Consecutive spans that every query of the tile sees whole, and that share a rotation
// (same segment, or own blocks), are taken GROUP at a time: one online-softmax update
// (max, rescale) per group instead of per block.
template <typename T>
void attend_item(const T* query, const T* kv, T* output, const Span* spans, int n_spans,
                 const int32_t* segs, const double* inv_freq, int q_start, int q0, int q1,
                 int seq_len, int q_len, int g, const Shape& sh) {
  const int B = sh.B, D = sh.D, G = sh.G, half = D / 2, Qt = q1 - q0, R = Qt * G;
  const int W = GROUP * B;  // score columns per row
  const int64_t tile = static_cast<int64_t>(B) * 2 * D;
  std::vector<float> buf(static_cast<size_t>(R) * D * 3 + static_cast<size_t>(MAXG) * W + D);
  float* q = buf.data();          // [Qt][G][D] scaled queries
  float* qr = q + R * D;          // the same, rotated for the current segment
  float* acc = qr + R * D;        // [Qt][G][D] unnormalized outputs
  float* sc = acc + R * D;        // [MAXG][GROUP * B] scores, then weights, of a group
  float* cs = sc + MAXG * W;      // [D] cos | sin of the current segment
  std::fill(acc, acc + R * D, 0.0f);
  float m[QTILE * MAXG], l[QTILE * MAXG], alpha[MAXG], ones[MAXG];
  const float* qp[MAXG];
  float *wp[MAXG], *ap[MAXG];
  std::fill(m, m + R, -INFINITY);
  std::fill(l, l + R, 0.0f);
  std::fill(ones, ones + MAXG, 1.0f);
  for (int i = 0; i < Qt; ++i)
    for (int h = 0; h < G; ++h) {
      const T* src = query + (static_cast<int64_t>(q_start + q0 + i) * sh.Hq + g * G + h) * D;
      float* dst = q + (i * G + h) * D;
      for (int d = 0; d < D; ++d) dst[d] = to_float(src[d]) * sh.scale;
    }
  const int qpos0 = seq_len - q_len + q0;  // logical position of the tile's first query
  int cur_seg = -2;
  // rows [r0, r0 + nr) of the tile (row r = query r / G, head r % G) read spans
  // grp[0..ng), span j's slots [lo_j, last[j]) landing in score columns j * B + slot:
  // scores, one online-softmax update, values
  auto tile_of = [&](const Span* x) -> const T* {
    return x ? kv + (static_cast<int64_t>(x->block) * sh.Hkv + g) * tile : nullptr;
  };
  // `after`: the span read after this group (its tiles are prefetched), or null
  auto attend_rows = [&](const float* qs, int r0, int nr, const Span* grp, int ng,
                         const int* last, const Span* after) {
    const T* kt[GROUP];  // per span: its key tile, the next tile to prefetch (or null),
    const T* pf[GROUP];  // and its score columns [c_lo, c_hi), whole 32-key tiles
    int c_lo[GROUP], c_hi[GROUP];
    for (int s = 0; s < ng; ++s) {
      kt[s] = tile_of(grp + s);
      pf[s] = R <= MAXG ? tile_of(s + 1 < ng ? grp + s + 1 : after) : nullptr;
      c_lo[s] = grp[s].off / 32 * 32;
      c_hi[s] = (last[s] + 31) / 32 * 32;
    }
    for (int j = 0; j < nr; ++j) qp[j] = qs + (r0 + j) * D;
    for (int s = 0; s < ng; ++s) {
      for (int j = 0; j < nr; ++j) wp[j] = sc + j * W + s * B;
      for (int c0 = c_lo[s]; c0 < c_hi[s]; c0 += 32)
        scores_all(qp, kt[s], B, D, c0, nr, wp, pf[s]);
      for (int j = 0; j < nr; ++j) {
        for (int t = c_lo[s]; t < grp[s].off; ++t) wp[j][t] = -INFINITY;
        for (int t = last[s]; t < c_hi[s]; ++t) wp[j][t] = -INFINITY;
      }
    }
    for (int j = 0; j < nr; ++j) {
      float* w = sc + j * W;
      vf vmax = vf{} - INFINITY;
      for (int s = 0; s < ng; ++s)
        for (int c = s * B + c_lo[s]; c < s * B + c_hi[s]; c += VL) {
          const vf x = loadv(w + c);
          vmax = x > vmax ? x : vmax;
        }
      float smax = -INFINITY;
      for (int k = 0; k < VL; ++k) smax = std::max(smax, vmax[k]);
      const int r = r0 + j;
      const float mnew = std::max(m[r], smax);
      alpha[j] = std::exp(m[r] - mnew);
      vf psum = vf{};
      for (int s = 0; s < ng; ++s)
        for (int c = s * B + c_lo[s]; c < s * B + c_hi[s]; c += VL) {
          const vf e = expv(loadv(w + c) - mnew);
          storev(w + c, e);
          psum += e;
        }
      float ps = 0.0f;
      for (int k = 0; k < VL; ++k) ps += psum[k];
      l[r] = l[r] * alpha[j] + ps;
      m[r] = mnew;
      ap[j] = acc + r * D;
    }
    const int64_t vo = static_cast<int64_t>(B) * D;  // values follow the keys in a tile
    for (int s = 0; s < ng; ++s) {
      for (int j = 0; j < nr; ++j) wp[j] = sc + j * W + s * B;
      values_all(ap, s == 0 ? alpha : ones, wp, kt[s] + vo, D, grp[s].off, last[s], nr,
                 pf[s] ? pf[s] + vo : nullptr);
    }
  };
  auto rotation = [&](int seg) -> const float* {  // the tile's queries for a span
    if (seg < 0) return q;
    if (seg != cur_seg) {  // rotate the tile's queries by -delta for this segment
      rotation_of(segs[seg * 5 + 2], inv_freq, half, cs);
      for (int r = 0; r < R; ++r) {
        const float* x = q + r * D;
        float* y = qr + r * D;
        for (int i = 0; i < half; ++i) {
          y[i] = x[i] * cs[i] + x[half + i] * cs[half + i];
          y[half + i] = x[half + i] * cs[i] - x[i] * cs[half + i];
        }
      }
      cur_seg = seg;
    }
    return qr;
  };
  int last[GROUP];
  for (int si = 0; si < n_spans;) {
    const Span& sp = spans[si];
    if (sp.pos > qpos0 + Qt - 1) break;  // every later key is after every query
    const float* qs = rotation(sp.seg);
    if (sp.pos + sp.n - 1 <= qpos0) {
      // every query of the tile sees the whole span, and maybe the next ones: up to
      // GROUP spans at once, up to MAXG rows per pass (each key and value row loaded
      // serves several queries)
      int ng = 0;
      while (ng < GROUP && si + ng < n_spans && spans[si + ng].seg == sp.seg &&
             spans[si + ng].pos + spans[si + ng].n - 1 <= qpos0) {
        last[ng] = spans[si + ng].off + spans[si + ng].n;
        ++ng;
      }
      // prefetch the next tiles only when one pass reads them (decode-sized tiles); a
      // longer tile reads each span several times and finds it in cache
      const Span* after = si + ng < n_spans && R <= MAXG ? spans + si + ng : nullptr;
      for (int r0 = 0; r0 < R; r0 += MAXG)
        attend_rows(qs, r0, std::min(MAXG, R - r0), spans + si, ng, last, after);
      si += ng;
    } else {
      for (int i = 0; i < Qt; ++i) {
        // slot t holds the key at position sp.pos + t - off; query i is at qpos0 + i
        last[0] = std::min(sp.off + sp.n, sp.off + (qpos0 + i - sp.pos) + 1);
        if (last[0] > sp.off)
          attend_rows(qs, i * G, G, &sp, 1, last, nullptr);
      }
      ++si;
    }
  }
  for (int i = 0; i < Qt; ++i)
    for (int h = 0; h < G; ++h) {
      const int r = i * G + h;
      const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
      T* dst = output + (static_cast<int64_t>(q_start + q0 + i) * sh.Hq + g * G + h) * D;
      for (int d = 0; d < D; ++d) dst[d] = static_cast<T>(acc[r * D + d] * inv);
    }
}

template <typename T>
void run(const torch::Tensor& query, const torch::Tensor& kv_cache, torch::Tensor& output,
         const torch::Tensor& rows, const torch::Tensor& block_table,
         const torch::Tensor& seg_ptr, const torch::Tensor& segs,
         const torch::Tensor& src_blocks, const torch::Tensor& inv_freq, const Shape& sh) {
  const int n_rows = rows.size(0);
  const int32_t* rw = rows.data_ptr<int32_t>();
  const int32_t* sp = seg_ptr.data_ptr<int32_t>();
  const int32_t* sg = segs.numel() ? segs.data_ptr<int32_t>() : nullptr;
  const auto spans = all_row_spans(rows, sh.B, block_table, seg_ptr, segs, src_blocks);
  struct Item { int row, g, q0, q1; };
  std::vector<Item> items;
  for (int r = 0; r < n_rows; ++r) {
    const int32_t* x = rw + r * 4;  // q_start, q_len, seq_len, table row
    for (int g = 0; g < sh.Hkv; ++g)
      for (int q0 = 0; q0 < x[1]; q0 += QTILE)
        items.push_back({r, g, q0, std::min(x[1], q0 + QTILE)});
  }
  const T* qp = query.data_ptr<T>();
  const T* kvp = kv_cache.data_ptr<T>();
  T* op = output.data_ptr<T>();
  const double* fr = inv_freq.data_ptr<double>();
  at::parallel_for(0, static_cast<int64_t>(items.size()), 1, [&](int64_t b, int64_t e) {
    for (int64_t w = b; w < e; ++w) {
      const Item& it = items[w];
      const int32_t* x = rw + it.row * 4;
      attend_item<T>(qp, kvp, op, spans[it.row].data(), spans[it.row].size(),
                        sg ? sg + sp[it.row] * 5 : nullptr, fr, x[0], it.q0, it.q1, x[2],
                        x[1], it.g, sh);
    }
  });
}


// Copies each row's keys and values, in position order, into consecutive blocks of
// `scratch` (same layout as the cache) from block first_block[r] on: own slots as they
// are, borrowed slots re-rotated by +delta, so that the scratch blocks hold the row's
// context as if it had computed it, ready for the stock kernel. Slots past seq_len in a
// row's last scratch block are zeroed.
template <typename T>
void materialize_rows(const torch::Tensor& kv_cache, torch::Tensor& scratch,
                      const torch::Tensor& rows, const torch::Tensor& block_table,
                      const torch::Tensor& seg_ptr, const torch::Tensor& segs,
                      const torch::Tensor& src_blocks, const torch::Tensor& inv_freq,
                      const torch::Tensor& first_block) {
  const int n_rows = rows.size(0), Hkv = kv_cache.size(1), B = kv_cache.size(2),
            D = kv_cache.size(3) / 2, half = D / 2;
  const int64_t tile = static_cast<int64_t>(B) * 2 * D;
  const int32_t* rw = rows.data_ptr<int32_t>();
  const int32_t* sp = seg_ptr.data_ptr<int32_t>();
  const int32_t* sg = segs.numel() ? segs.data_ptr<int32_t>() : nullptr;
  const int32_t* fb = first_block.data_ptr<int32_t>();
  const auto spans = all_row_spans(rows, B, block_table, seg_ptr, segs, src_blocks);
  const T* kvp = kv_cache.data_ptr<T>();
  T* out = scratch.data_ptr<T>();
  const double* fr = inv_freq.data_ptr<double>();
  at::parallel_for(0, static_cast<int64_t>(n_rows) * Hkv, 1, [&](int64_t b, int64_t e) {
    std::vector<float> cs(D);
    for (int64_t w = b; w < e; ++w) {
      const int r = w / Hkv, g = w % Hkv;
      int cur_seg = -2;
      for (const Span& x : spans[r]) {
        const T* st = kvp + (static_cast<int64_t>(x.block) * Hkv + g) * tile;
        if (x.seg >= 0 && x.seg != cur_seg) {
          rotation_of(sg[(sp[r] + x.seg) * 5 + 2], fr, half, cs.data());
          cur_seg = x.seg;
        }
        int p = x.pos, o = x.off, left = x.n;
        while (left > 0) {  // a misaligned segment span may cross a scratch block
          const int doff = p % B, n = std::min(left, B - doff);
          T* dt = out + (static_cast<int64_t>(fb[r] + p / B) * Hkv + g) * tile;
          if (x.seg < 0) {
            for (int d = 0; d < D; ++d)
              std::memcpy(dt + d * B + doff, st + d * B + o, n * sizeof(T));
          } else {
            for (int d = 0; d < half; ++d) {
              const float c = cs[d], s = cs[half + d];
              const T* a = st + d * B + o;
              const T* bb = st + (d + half) * B + o;
              T* da = dt + d * B + doff;
              T* db = dt + (d + half) * B + doff;
              for (int i = 0; i < n; ++i) {
                const float ka = to_float(a[i]), kb = to_float(bb[i]);
                da[i] = static_cast<T>(ka * c - kb * s);
                db[i] = static_cast<T>(kb * c + ka * s);
              }
            }
          }
          std::memcpy(dt + B * D + doff * D, st + B * D + o * D, n * D * sizeof(T));
          p += n;
          o += n;
          left -= n;
        }
      }
      const int seq_len = rw[r * 4 + 2], tail = seq_len % B;
      if (tail) {  // vLLM's kernel reads whole blocks: the slots past seq_len must be finite
        T* dt = out + (static_cast<int64_t>(fb[r] + seq_len / B) * Hkv + g) * tile;
        for (int d = 0; d < D; ++d) std::fill(dt + d * B + tail, dt + (d + 1) * B, T(0));
        std::fill(dt + B * D + tail * D, dt + 2 * B * D, T(0));
      }
    }
  });
}

}  // namespace

// query [T, Hq, D]; kv_cache [NB, Hkv, B, 2D]; output [T, Hq, D] (rows' tokens written);
// rows int32 [R, 4] = (q_start, q_len, seq_len, block-table row); seg_ptr int32 [R + 1];
// segs int32 [S, 5] = (dst, len, delta, src, src_tab), sorted by dst within a row;
// src_blocks int32; inv_freq float64 [D / 2].
void borrowed_attention(const torch::Tensor& query, const torch::Tensor& kv_cache,
                        torch::Tensor& output, const torch::Tensor& rows,
                        const torch::Tensor& block_table, const torch::Tensor& seg_ptr,
                        const torch::Tensor& segs, const torch::Tensor& src_blocks,
                        const torch::Tensor& inv_freq, double scale) {
  TORCH_CHECK(query.dim() == 3 && query.is_contiguous(), "query must be [T, Hq, D] contiguous");
  TORCH_CHECK(output.sizes() == query.sizes() && output.is_contiguous(),
              "output must be contiguous and shaped like query");
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous() &&
                  kv_cache.size(3) == 2 * query.size(2),
              "kv_cache must be [blocks, kv_heads, block_size, 2 * head_dim] contiguous");
  TORCH_CHECK(query.size(1) % kv_cache.size(1) == 0, "query heads must be a multiple of kv heads");
  TORCH_CHECK(query.scalar_type() == kv_cache.scalar_type() &&
                  output.scalar_type() == query.scalar_type(),
              "query, kv_cache and output must share a dtype");
  TORCH_CHECK(query.size(2) % 2 == 0 && inv_freq.numel() == query.size(2) / 2 &&
                  inv_freq.scalar_type() == torch::kFloat64,
              "inv_freq must be float64 [head_dim / 2]");
  for (const auto* t : {&rows, &block_table, &seg_ptr, &segs, &src_blocks})
    TORCH_CHECK(t->scalar_type() == torch::kInt32 && t->is_contiguous(),
                "index tensors must be contiguous int32");
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == 4, "rows must be [R, 4]");
  TORCH_CHECK(seg_ptr.numel() == rows.size(0) + 1, "seg_ptr must have R + 1 entries");
  const int B = kv_cache.size(2), D = query.size(2);
  TORCH_CHECK(B % 32 == 0, "kvdedup borrowed attention: block size ", B,
              " is not supported (a multiple of 32)");
  TORCH_CHECK(D % 64 == 0, "kvdedup borrowed attention: head size ", D,
              " is not supported (a multiple of 64)");
  TORCH_CHECK(query.size(1) / kv_cache.size(1) <= MAXG, "kvdedup borrowed attention: ",
              query.size(1) / kv_cache.size(1), " query heads per KV head (at most ", MAXG, ")");
  const Shape sh{B, D, static_cast<int>(query.size(1)), static_cast<int>(kv_cache.size(1)),
                 static_cast<int>(query.size(1) / kv_cache.size(1)), static_cast<float>(scale)};
  switch (query.scalar_type()) {
    case torch::kFloat32:
      return run<float>(query, kv_cache, output, rows, block_table, seg_ptr,
                                   segs, src_blocks, inv_freq, sh);
    case torch::kBFloat16:
      return run<c10::BFloat16>(query, kv_cache, output, rows, block_table,
                                           seg_ptr, segs, src_blocks, inv_freq, sh);
    case torch::kFloat16:
      return run<c10::Half>(query, kv_cache, output, rows, block_table,
                                       seg_ptr, segs, src_blocks, inv_freq, sh);
    default:
      TORCH_CHECK(false, "kvdedup borrowed attention: unsupported dtype ", query.scalar_type());
  }
}

// kv_cache, scratch [NB, Hkv, B, 2D] (the same dtype); rows, block_table, seg_ptr, segs,
// src_blocks, inv_freq as for borrowed_attention; first_block int32 [R]: row r's context
// goes to scratch blocks first_block[r], first_block[r] + 1, ...
void materialize(const torch::Tensor& kv_cache, torch::Tensor& scratch,
                 const torch::Tensor& rows, const torch::Tensor& block_table,
                 const torch::Tensor& seg_ptr, const torch::Tensor& segs,
                 const torch::Tensor& src_blocks, const torch::Tensor& inv_freq,
                 const torch::Tensor& first_block) {
  TORCH_CHECK(kv_cache.dim() == 4 && kv_cache.is_contiguous() && scratch.is_contiguous() &&
                  scratch.dim() == 4 && scratch.size(1) == kv_cache.size(1) &&
                  scratch.size(2) == kv_cache.size(2) && scratch.size(3) == kv_cache.size(3) &&
                  scratch.scalar_type() == kv_cache.scalar_type(),
              "scratch must be a contiguous [blocks, kv_heads, block_size, 2 * head_dim] "
              "tensor of the cache's dtype");
  for (const auto* t : {&rows, &block_table, &seg_ptr, &segs, &src_blocks, &first_block})
    TORCH_CHECK(t->scalar_type() == torch::kInt32 && t->is_contiguous(),
                "index tensors must be contiguous int32");
  TORCH_CHECK(rows.dim() == 2 && rows.size(1) == 4 && seg_ptr.numel() == rows.size(0) + 1 &&
                  first_block.numel() == rows.size(0),
              "rows must be [R, 4], seg_ptr [R + 1], first_block [R]");
  TORCH_CHECK(inv_freq.scalar_type() == torch::kFloat64 &&
                  inv_freq.numel() == kv_cache.size(3) / 4,
              "inv_freq must be float64 [head_dim / 2]");
  const int B = kv_cache.size(2);
  const int32_t* rw = rows.data_ptr<int32_t>();
  const int32_t* fb = first_block.data_ptr<int32_t>();
  for (int r = 0; r < rows.size(0); ++r)
    TORCH_CHECK(fb[r] >= 0 && fb[r] + (rw[r * 4 + 2] + B - 1) / B <= scratch.size(0),
                "kvdedup materialize: row ", r, " does not fit in the scratch blocks");
  switch (kv_cache.scalar_type()) {
    case torch::kFloat32:
      return materialize_rows<float>(kv_cache, scratch, rows, block_table, seg_ptr, segs,
                                     src_blocks, inv_freq, first_block);
    case torch::kBFloat16:
      return materialize_rows<c10::BFloat16>(kv_cache, scratch, rows, block_table, seg_ptr,
                                             segs, src_blocks, inv_freq, first_block);
    case torch::kFloat16:
      return materialize_rows<c10::Half>(kv_cache, scratch, rows, block_table, seg_ptr, segs,
                                         src_blocks, inv_freq, first_block);
    default:
      TORCH_CHECK(false, "kvdedup materialize: unsupported dtype ", kv_cache.scalar_type());
  }
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("materialize", &materialize,
        "copy rows' own and borrowed (re-rotated) KV into scratch blocks (kvdedup shared mode)");
  m.def("borrowed_attention", &borrowed_attention,
        "attention over own KV blocks plus borrowed segments (kvdedup shared mode)");
}
