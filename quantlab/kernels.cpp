// quantlab's CPU kernels, built and loaded by quantlab/kernels.py: a plain C ABI (no torch headers), GCC vector
// extensions of the machine's vector width (-march=native: 16 floats with AVX-512, 8 with AVX2, else 4), OpenMP's
// threads (else std::threads). The values do not depend on the width: every operation is per lane except two sums,
// which add 16 lanes in one order whatever the width (``group_sum``).
// - fake_quantize: Eq. 1 of 2DQuant in one pass, the same values as quantlab.quant.fake_quantize's eager ops
//   (built with -ffp-contract=off: (x - l) / s, clamp, round half to even, * s, + l, each rounded as torch does);
//   fake_quantize_train also writes the rounding residual r - c_hat, fake_quantize_backward gives Eq. 2.
// - window_attention: softmax(Q K^T * scale + bias (+ mask)) V in one pass per (window, head), one query row at a
//   time in registers (no attention map in memory), optionally fake-quantizing Q (after the scale), K, the softmax
//   output and V; for a calibration, optionally the softmax output written out, or only its min, max and the
//   elements at given positions.
// - summarize: a tensor's min, max and elements at given positions in one sweep (DOBI's statistics); histogram:
//   torch.histc's counts; candidate_errors: DOBI's squared errors of many bound candidates.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

// GCC's vectors wider than the machine's registers compile to scalar code for comparisons and to stack traffic for
// scalar operands (~10x slower kernels on an AVX2 CPU with 16 lanes), so the width is the machine's.
#if defined(__AVX512F__)
constexpr int64_t kLanes = 16;
#elif defined(__AVX__)
constexpr int64_t kLanes = 8;
#else
constexpr int64_t kLanes = 4;
#endif
constexpr int64_t kSumLanes = 16;  // the width of the sums that must not depend on kLanes (a multiple of it)
constexpr int64_t kSumGroups = kSumLanes / kLanes;
typedef float Floats __attribute__((vector_size(kLanes * sizeof(float))));
typedef int32_t Ints __attribute__((vector_size(kLanes * sizeof(int32_t))));

inline Floats splat(float x) { return Floats{} + x; }
// A NaN in ``a`` is kept (as torch's clamp and max keep it), so a NaN input gives a NaN output, never a bound.
inline Floats maximum(Floats a, Floats b) { return a > b || a != a ? a : b; }
inline Floats load(const float* x) { Floats v; std::memcpy(&v, x, sizeof v); return v; }
inline void store(float* x, Floats v) { std::memcpy(x, &v, sizeof v); }

// The first ``lanes`` (<= kLanes) floats at x, zeros after them; and the first ``lanes`` of v written to x.
inline Floats load_n(const float* x, int64_t lanes) {
  if (lanes == kLanes) return load(x);
  float buffer[kLanes] = {};
  std::copy(x, x + lanes, buffer);
  return load(buffer);
}
inline void store_n(float* x, Floats v, int64_t lanes) {
  if (lanes == kLanes) return store(x, v);
  for (int64_t lane = 0; lane < lanes; ++lane) x[lane] = v[lane];
}

// x rounded to the nearest integer, ties to even (as torch.round), for 0 <= x < 2^22.
inline Floats round_nonnegative(Floats x) {
  const Floats magic = splat(12582912.0f);  // 1.5 * 2^23: the sum keeps no fraction bits
  return (x + magic) - magic;
}

// exp(t) for t <= 0: Cephes' expf (2^n times a degree-6 polynomial, ~1 ulp); 0 below -87 (no denormals).
inline Floats exp_nonpositive(Floats t) {
  const Ints underflow = t < splat(-87.0f);
  t = maximum(t, splat(-87.0f));
  const Floats n = round_nonnegative(t * 1.44269504088896341f + 200.0f) - 200.0f;
  Floats r = t - n * 0.693359375f;
  r = r + n * 2.12194440e-4f;
  Floats y = splat(1.9875691500e-4f);
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * r * r + r + 1.0f;
  const Ints bits = (__builtin_convertvector(n, Ints) + 127) << 23;
  Floats pow2;
  std::memcpy(&pow2, &bits, sizeof pow2);
  return underflow ? splat(0.0f) : y * pow2;
}

float lane_max(Floats v) {
  float top = v[0];
  for (int64_t lane = 1; lane < kLanes; ++lane) top = std::max(top, v[lane]);
  return top;
}

// The kSumLanes lanes of ``parts`` (kSumGroups vectors, lanes 0 to kLanes - 1 first) added one after another: vector
// x of a row of sums goes to parts[x % kSumGroups], so lane j of the sum gets the elements j, j + 16, ... in order,
// as one vector of 16 does.
float group_sum(const Floats* parts) {
  float total = 0.0f;
  for (int64_t group = 0; group < kSumGroups; ++group)
    for (int64_t lane = 0; lane < kLanes; ++lane) total += parts[group][lane];
  return total;
}

struct Quantizer {  // Eq. 1 on [lower, lower + levels * step]; off: pass-through
  bool on;
  float lower, step, levels;

  // c_hat = clip((x - l) / s, 0, n) in one max and one min instruction: the bound as the comparison's first operand
  // keeps a NaN in x (as torch.clamp does); -0 stays -0, which rounding makes +0.
  Floats level(Floats x) const {
    const Floats scaled = (x - lower) / step, zero = splat(0.0f), top = splat(levels);
    const Floats positive = zero > scaled ? zero : scaled;
    return top < positive ? top : positive;
  }

  Floats operator()(Floats x) const { return on ? round_nonnegative(level(x)) * step + lower : x; }
};

struct Problem {
  const float *q, *k, *v, *bias, *mask;  // mask: nullptr, or (mask_windows, tokens, tokens), added to the bias
  int64_t qs[4], ks[4], vs[4];  // element strides of (batch, head, token, channel)
  int64_t bias_windows, mask_windows, batch, heads, tokens, dim;
  float scale;
  Quantizer quantizers[4];  // Q, K, softmax output, V
  float* out;               // (batch, tokens, heads, dim), contiguous
  float* probabilities;     // nullptr, or (batch, heads, tokens, tokens): the (quantized) softmax output
  const int64_t* offsets;   // sorted flat positions in that softmax output whose elements go to sample
  int64_t offset_count;
  float* sample;            // offset_count floats
  float* extremes;          // nullptr (no sample either), or 2 floats per worker: min and max of the softmax output
                            // over the worker's items
};

// Min and max that give NaN when either operand is NaN (as torch.aminmax does for a tensor with one).
inline float min_keeping_nan(float a, float b) { return a != a || b != b ? NAN : std::min(a, b); }
inline float max_keeping_nan(float a, float b) { return a != a || b != b ? NAN : std::max(a, b); }

// A running lane-wise min and max, and which lanes have seen a NaN (then both extremes are NaN, as torch.aminmax
// gives for a tensor holding one): plain min/max instructions, the NaN test beside them.
struct Extremes {
  Floats lo = splat(INFINITY), hi = splat(-INFINITY);
  Ints nan = Ints{};

  void update(Floats v) {
    lo = v < lo ? v : lo;
    hi = v > hi ? v : hi;
    nan |= v != v;
  }
};

// The first n floats of ``row`` folded into ``extremes``, all in vectors: the tail is the row's last whole vector
// (elements seen twice change neither extreme) or, in a row shorter than one, the row padded with row[0].
inline void update_row_extremes(const float* row, int64_t n, Extremes& extremes) {
  Extremes running = extremes;  // in registers (a store through extremes could change row, for all the compiler knows)
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) running.update(load(row + j));
  if (j < n) {
    float buffer[kLanes];
    if (n < kLanes) {
      std::fill(buffer, buffer + kLanes, row[0]);
      std::copy(row, row + n, buffer);
    }
    running.update(n < kLanes ? load(buffer) : load(row + n - kLanes));
  }
  extremes = running;
}

// The lane-wise extremes folded into one min and max, written to parts[2 * worker] and the next (NaN, NaN if a lane
// saw one).
inline void finish_extremes(const Extremes& extremes, float* parts, int64_t worker) {
  float low = INFINITY, high = -INFINITY;
  bool nan = false;
  for (int64_t lane = 0; lane < kLanes; ++lane) {
    low = std::min(low, extremes.lo[lane]);
    high = std::max(high, extremes.hi[lane]);
    nan = nan || extremes.nan[lane];
  }
  parts[2 * worker] = nan ? NAN : low;
  parts[2 * worker + 1] = nan ? NAN : high;
}

// The min and max of the workers' parts (2 floats each) into extremes[0] and extremes[1].
inline void combine_extremes(const std::vector<float>& parts, int64_t workers, float* extremes) {
  extremes[0] = INFINITY;
  extremes[1] = -INFINITY;
  for (int64_t w = 0; w < workers; ++w) {
    extremes[0] = min_keeping_nan(extremes[0], parts[2 * w]);
    extremes[1] = max_keeping_nan(extremes[1], parts[2 * w + 1]);
  }
}

// The first ``count`` floats of ``x`` (a multiple of kLanes) quantized in place, unless ``quantizer`` is off. The
// attention quantizes its copies of Q, K^T and V this way, whole, once per (window, head), not a row at a time as it
// uses them: a vector load right after the scalar stores of its copy waits for them, and Q's row was on the critical
// path of every score (the four quantizers cost 1.20x the FP attention that way, 1.11x this way, on an AVX2 EPYC).
inline void quantize_rows(float* x, int64_t count, const Quantizer& quantizer) {
  if (quantizer.on)
    for (int64_t i = 0; i < count; i += kLanes) store(x + i, quantizer(load(x + i)));
}

// One (window, head) pair after another: Q (scaled), K^T and V copied (quantized) into rows of whole vectors, then
// per query row the scores (vectors over keys; padded keys get -inf), softmax, quantized P, and P V. Padding lanes are
// computed whole and never stored: a padded channel's value only reaches output lanes past d, and V's padded key rows
// stay 0 (their probabilities, Q(0), may not be), so that P V adds nothing for them.
void attend(const Problem& p, int64_t worker, int64_t first, int64_t last) {
  const int64_t n = p.tokens, d = p.dim;
  const int64_t key_vectors = (n + kLanes - 1) / kLanes, channel_vectors = (d + kLanes - 1) / kLanes;
  const int64_t keys = key_vectors * kLanes, channels = channel_vectors * kLanes;
  std::vector<float> k_t(d * keys), v_rows(keys * channels), q_rows(n * channels), row(keys);
  std::vector<float> bias_row(keys, -INFINITY);
  std::vector<Floats> scores(key_vectors);
  Extremes extremes;
  int64_t picked = std::lower_bound(p.offsets, p.offsets + p.offset_count, first * n * n) - p.offsets;
  for (int64_t item = first; item < last; ++item) {
    const int64_t b = item / p.heads, h = item % p.heads;
    const float* k = p.k + b * p.ks[0] + h * p.ks[1];
    const float* v = p.v + b * p.vs[0] + h * p.vs[1];
    for (int64_t j = 0; j < n; ++j)  // padded keys keep finite values: their scores are -inf whatever they are
      for (int64_t c = 0; c < d; ++c) k_t[c * keys + j] = k[j * p.ks[2] + c * p.ks[3]];
    for (int64_t j = 0; j < n; ++j) {
      float* v_row = &v_rows[j * channels];
      if (p.vs[3] == 1) {
        std::copy(v + j * p.vs[2], v + j * p.vs[2] + d, v_row);
      } else {
        for (int64_t c = 0; c < d; ++c) v_row[c] = v[j * p.vs[2] + c * p.vs[3]];
      }
    }
    quantize_rows(v_rows.data(), n * channels, p.quantizers[3]);
    quantize_rows(k_t.data(), d * keys, p.quantizers[1]);
    const float* bias = p.bias + ((b % p.bias_windows) * p.heads + h) * n * n;
    const float* mask = p.mask ? p.mask + (b % p.mask_windows) * n * n : nullptr;
    const float* q = p.q + b * p.qs[0] + h * p.qs[1];
    float* out = p.out + (b * n * p.heads + h) * d;
    for (int64_t i = 0; i < n; ++i)
      for (int64_t c = 0; c < d; ++c) q_rows[i * channels + c] = q[i * p.qs[2] + c * p.qs[3]] * p.scale;
    quantize_rows(q_rows.data(), n * channels, p.quantizers[0]);
    for (int64_t i = 0; i < n; ++i) {
      const float* q_row = &q_rows[i * channels];
      // The bias (plus the mask: mask + bias, as one tensor of them holds it) read in place when the keys fill
      // whole vectors, else from a copy padded with -inf.
      const float* bias_in = bias + i * n;
      const float* mask_in = mask ? mask + i * n : nullptr;
      if (n != keys)
        for (int64_t j = 0; j < n; ++j) bias_row[j] = mask_in ? mask_in[j] + bias_in[j] : bias_in[j];
      const float* bias_vectors = n == keys ? bias_in : bias_row.data();
      const float* mask_vectors = n == keys ? mask_in : nullptr;
      auto bias_at = [&](int64_t x) {
        const Floats position = load(bias_vectors + x * kLanes);
        return mask_vectors ? load(mask_vectors + x * kLanes) + position : position;
      };
      Floats top = splat(-INFINITY);
      int64_t x = 0;
      for (; x + 4 <= key_vectors; x += 4) {  // four key vectors per pass: one broadcast of each Q element for four
        Floats dots[4] = {};
        for (int64_t c = 0; c < d; ++c) {
          const Floats query = splat(q_row[c]);
          const float* keys_c = &k_t[c * keys + x * kLanes];
          for (int64_t u = 0; u < 4; ++u) dots[u] += query * load(keys_c + u * kLanes);
        }
        for (int64_t u = 0; u < 4; ++u) {
          scores[x + u] = dots[u] + bias_at(x + u);
          top = maximum(top, scores[x + u]);
        }
      }
      for (; x < key_vectors; ++x) {
        Floats dot = splat(0.0f);
        for (int64_t c = 0; c < d; ++c) dot += q_row[c] * load(&k_t[c * keys + x * kLanes]);
        scores[x] = dot + bias_at(x);
        top = maximum(top, scores[x]);
      }
      const float row_max = lane_max(top);
      Floats totals[kSumGroups] = {};  // padded keys add exp(-inf) = 0: no change
      for (int64_t x = 0; x < key_vectors; ++x) {
        scores[x] = exp_nonpositive(scores[x] - row_max);
        totals[x % kSumGroups] += scores[x];
      }
      const float inverse = 1.0f / group_sum(totals);
      for (int64_t x = 0; x < key_vectors; ++x) store(&row[x * kLanes], p.quantizers[2](scores[x] * inverse));
      const int64_t row_start = (item * n + i) * n;  // item = b * heads + h
      if (p.probabilities) std::copy(row.begin(), row.begin() + n, p.probabilities + row_start);
      if (p.extremes) {
        update_row_extremes(row.data(), n, extremes);
        for (; picked < p.offset_count && p.offsets[picked] < row_start + n; ++picked)
          p.sample[picked] = row[p.offsets[picked] - row_start];
      }
      float* out_row = out + i * p.heads * d;
      for (int64_t x = 0; x < channel_vectors; ++x) {  // P V, kLanes channels at a time, four independent sums
        const float* v_x = &v_rows[x * kLanes];
        Floats sums[4] = {};
        for (int64_t j = 0; j < keys; j += 4)
          for (int64_t part = 0; part < 4; ++part) sums[part] += row[j + part] * load(v_x + (j + part) * channels);
        const Floats result = (sums[0] + sums[1]) + (sums[2] + sums[3]);
        store_n(out_row + x * kLanes, result, std::min(kLanes, d - x * kLanes));
      }
    }
  }
  if (p.extremes) finish_extremes(extremes, p.extremes, worker);
}

void quantize_range(const float* x, float* out, int64_t first, int64_t last, Quantizer quantizer) {
  for (int64_t i = first; i < last; i += kLanes) {
    const int64_t lanes = std::min(kLanes, last - i);
    store_n(out + i, quantizer(load_n(x + i, lanes)), lanes);
  }
}

// Runs work(worker, first, last) over [0, count) split between up to ``threads`` workers (0, 1, ...; at least
// ``grain`` items each, the same ranges however they run); returns how many workers ran. Built with OpenMP, the
// workers are the threads of the process's OpenMP pool (PyTorch's, when it is loaded: no second set of threads
// competing with its waiting ones for the cores), else std::threads.
template <typename Work>
int64_t split(int64_t count, int threads, int64_t grain, Work work) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(threads, count / grain));
  if (workers == 1) {
    work(0, 0, count);
    return 1;
  }
#ifdef _OPENMP
#pragma omp parallel num_threads(workers)
  for (int64_t w = omp_get_thread_num(); w < workers; w += omp_get_num_threads())
    work(w, count * w / workers, count * (w + 1) / workers);
#else
  std::vector<std::thread> pool;
  for (int64_t w = 1; w < workers; ++w) pool.emplace_back(work, w, count * w / workers, count * (w + 1) / workers);
  work(0, 0, count / workers);
  for (auto& thread : pool) thread.join();
#endif
  return workers;
}

// Eq. 1 over [first, last) writing x_q and r - c_hat (the residual Eq. 2 needs).
void quantize_train_range(const float* x, float* out, float* residual, int64_t first, int64_t last,
                          Quantizer quantizer) {
  for (int64_t i = first; i < last; i += kLanes) {
    const int64_t lanes = std::min(kLanes, last - i);
    const Floats level = quantizer.level(load_n(x + i, lanes));
    const Floats rounded = round_nonnegative(level);
    store_n(out + i, rounded * quantizer.step + quantizer.lower, lanes);
    store_n(residual + i, rounded - level, lanes);
  }
}

// Eq. 2 over [first, last): grad_x (unless nullptr) and, into sums, the sums of grad dx_q/dl and grad dx_q/du.
void quantize_backward_range(const float* grad, const float* x, const float* residual, float* grad_x, int64_t first,
                             int64_t last, float lower, float upper, float levels, double* sums) {
  const float fraction = 1.0f / levels;
  double d_lower = 0.0, d_upper = 0.0;
  for (int64_t start = first; start < last; start += kSumLanes) {  // 16 elements' terms summed in float, then added
    Floats lower_terms[kSumGroups], upper_terms[kSumGroups];
    for (int64_t group = 0; group < kSumGroups; ++group) {
      const int64_t i = start + group * kLanes, lanes = std::clamp<int64_t>(last - i, 0, kLanes);
      const Floats values = load_n(x + i, lanes), gradients = load_n(grad + i, lanes);
      const Floats shift = load_n(residual + i, lanes) * fraction;
      const Floats below = values <= lower ? splat(1.0f) : splat(0.0f);
      const Floats above = values >= upper ? splat(1.0f) : splat(0.0f);
      lower_terms[group] = gradients * (below - shift);  // zero lanes past ``lanes``: no contribution
      upper_terms[group] = gradients * (above + shift);
      if (grad_x) store_n(grad_x + i, (values >= lower) & (values <= upper) ? gradients : splat(0.0f), lanes);
    }
    d_lower += group_sum(lower_terms);
    d_upper += group_sum(upper_terms);
  }
  sums[0] = d_lower;
  sums[1] = d_upper;
}

}  // namespace

extern "C" int uses_openmp() {
  // 1 when built with OpenMP (the workers are the OpenMP pool's threads), 0 with std::threads.
#ifdef _OPENMP
  return 1;
#else
  return 0;
#endif
}

extern "C" int fake_quantize_train(const float* x, float* out, float* residual, int64_t count, float lower, float step,
                                   float levels, int threads) {
  // out = Eq. 1 of x, residual = round(c_hat) - c_hat (count floats each). Returns 0.
  const Quantizer quantizer{true, lower, step, levels};
  split(count, threads, 1 << 18, [&](int64_t, int64_t first, int64_t last) {
    quantize_train_range(x, out, residual, first, last, quantizer);
  });
  return 0;
}

extern "C" int fake_quantize_backward(const float* grad, const float* x, const float* residual, float* grad_x,
                                      int64_t count, float lower, float upper, float levels, double* sums,
                                      int threads) {
  // Eq. 2 with u the repaired upper bound: grad_x = grad 1[l <= x <= u] (grad_x may be nullptr); sums[0] =
  // sum grad (1[x <= l] - residual / n), sums[1] = sum grad (1[x >= u] + residual / n). Returns 0.
  std::vector<double> parts(2 * std::max(threads, 1), 0.0);
  split(count, threads, 1 << 18, [&](int64_t worker, int64_t first, int64_t last) {
    quantize_backward_range(grad, x, residual, grad_x, first, last, lower, upper, levels, &parts[2 * worker]);
  });
  sums[0] = sums[1] = 0.0;
  for (size_t w = 0; w < parts.size(); w += 2) {
    sums[0] += parts[w];
    sums[1] += parts[w + 1];
  }
  return 0;
}

extern "C" int fake_quantize(const float* x, float* out, int64_t count, float lower, float step, float levels,
                             int threads) {
  // out = Eq. 1 of x (count floats; out may be x). Returns 0.
  const Quantizer quantizer{true, lower, step, levels};
  split(count, threads, 1 << 18, [&](int64_t, int64_t first, int64_t last) { quantize_range(x, out, first, last, quantizer); });
  return 0;
}

extern "C" int summarize(const float* x, const int64_t* sizes, const int64_t* strides, int64_t dims, int64_t parts,
                         const int64_t* const* offsets, const int64_t* counts, float* sample, float* extremes,
                         int threads) {
  // x's elements (dims sizes and element strides, the last stride 1, each row of the last dim after the previous
  // one in memory), each row cut into ``parts`` equal parts (e.g. the q, k and v columns of a qkv projection): for
  // part p, its min and max into extremes[2p] and extremes[2p + 1] (NaN if it holds one) and its elements at the
  // counts[p] sorted offsets[p] (in elements from the part's first element) into sample, the parts' samples after
  // one another; in one sweep of memory. Returns 0.
  std::vector<int64_t> shape(sizes, sizes + dims), step(strides, strides + dims);
  const int64_t elements = dims == 1 ? sizes[0] : INT64_MAX;
  const int64_t part = 1 << 14;
  if (dims == 1 && parts == 1) shape = {(elements + part - 1) / part, std::min(part, elements)}, step = {part, 1};
  const int64_t inner = shape.back(), outer = static_cast<int64_t>(shape.size()) - 1, width = inner / parts;
  int64_t rows = 1;
  for (int64_t dim = 0; dim < outer; ++dim) rows *= shape[dim];
  std::vector<int64_t> starts(parts + 1, 0);  // part p's samples are sample[starts[p]:starts[p + 1]]
  for (int64_t p = 0; p < parts; ++p) starts[p + 1] = starts[p] + counts[p];
  std::vector<float> worker_extremes(2 * parts * std::max(threads, 1));
  const int64_t workers = split(rows, threads, std::max<int64_t>(1, (1 << 16) / inner),
                                [&](int64_t worker, int64_t first, int64_t last) {
    std::vector<int64_t> index(outer, 0);  // the row's index over the outer dims
    int64_t base = 0;
    for (int64_t dim = outer - 1, rest = first; dim >= 0; --dim) {
      index[dim] = rest % shape[dim];
      rest /= shape[dim];
      base += index[dim] * step[dim];
    }
    std::vector<Extremes> extremes_of(parts);
    std::vector<int64_t> picked(parts);
    for (int64_t p = 0; p < parts; ++p)
      picked[p] = std::lower_bound(offsets[p], offsets[p] + counts[p], base) - offsets[p];
    for (int64_t row = first; row < last; ++row) {
      const int64_t length = std::min(width, elements - base);  // a 1-D x's last row may be shorter
      for (int64_t p = 0; p < parts; ++p) {
        const float* start = x + base + p * width;
        update_row_extremes(start, length, extremes_of[p]);
        float* part_sample = sample + starts[p];
        for (int64_t& j = picked[p]; j < counts[p] && offsets[p][j] < base + length; ++j)
          part_sample[j] = start[offsets[p][j] - base];
      }
      for (int64_t dim = outer - 1; dim >= 0; --dim) {  // the next row: an odometer over the outer dims
        base += step[dim];
        if (++index[dim] < shape[dim]) break;
        base -= index[dim] * step[dim];
        index[dim] = 0;
      }
    }
    for (int64_t p = 0; p < parts; ++p)
      finish_extremes(extremes_of[p], worker_extremes.data() + 2 * parts * worker, p);
  });
  for (int64_t p = 0; p < parts; ++p) {
    std::vector<float> part_extremes(2 * workers);
    for (int64_t w = 0; w < workers; ++w)
      std::copy_n(worker_extremes.data() + 2 * (parts * w + p), 2, part_extremes.data() + 2 * w);
    combine_extremes(part_extremes, workers, extremes + 2 * p);
  }
  return 0;
}

extern "C" int candidate_errors(const float* x, int64_t count, const float* lower, const float* step,
                                int64_t candidates, float levels, float* errors, int threads) {
  // errors[k * count + i] = (Q_k(x[i]) - x[i])^2, Q_k Eq. 1 on [lower[k], lower[k] + levels * step[k]]: the values of
  // quantlab.calibrate.quantization_error's six eager passes per element, in one. Returns 0.
  split(candidates, threads, 8, [&](int64_t, int64_t first, int64_t last) {
    for (int64_t k = first; k < last; ++k) {
      const Quantizer quantizer{true, lower[k], step[k], levels};
      for (int64_t i = 0; i < count; i += kLanes) {
        const int64_t lanes = std::min(kLanes, count - i);
        const Floats values = load_n(x + i, lanes), error = quantizer(values) - values;
        store_n(errors + k * count + i, error * error, lanes);
      }
    }
  });
  return 0;
}

extern "C" int histogram(const float* x, int64_t count, float lower, float upper, int64_t bins, float* counts) {
  // torch.histc(x, bins, lower, upper) for lower < upper, into counts (bins floats): an element in [lower, upper]
  // (NaN never) goes to bin (int64)((x - lower) * bins / (upper - lower)) in float arithmetic, the last bin taking
  // upper; the same counts as PyTorch's CPU kernel. Bins computed a vector at a time (the same IEEE operations per
  // lane), counted in integers. Returns 0.
  std::vector<int32_t> tally(bins + 1, 0);  // slot ``bins``: elements outside [lower, upper]
  const float range = upper - lower, scale = static_cast<float>(bins);
  for (int64_t i = 0; i < count; i += kLanes) {
    const int64_t lanes = std::min(kLanes, count - i);
    const Floats values = load_n(x + i, lanes);
    const Ints inside = (values >= lower) & (values <= upper);
    const Ints bin = __builtin_convertvector(inside ? (values - lower) * scale / range : splat(0.0f), Ints);
    for (int64_t lane = 0; lane < lanes; ++lane)
      ++tally[!inside[lane] ? bins : bin[lane] == bins ? bins - 1 : bin[lane]];
  }
  for (int64_t b = 0; b < bins; ++b) counts[b] = static_cast<float>(tally[b]);
  return 0;
}

extern "C" int window_attention(const float* q, const float* k, const float* v, const int64_t* strides,
                                const float* bias, int64_t bias_windows, const float* mask, int64_t mask_windows,
                                float* out, int64_t batch, int64_t heads,
                                int64_t tokens, int64_t dim, float scale, const float* quantizers,
                                float* probabilities, const int64_t* offsets, int64_t offset_count, float* sample,
                                float* extremes, int threads) {
  // strides: 12 element strides, (batch, head, token, channel) of q, k, v in turn. mask: nullptr, or mask_windows
  // (tokens, tokens) masks added to the bias (window b gets mask b % mask_windows). quantizers: nullptr, or 16
  // floats (on, lower, step, levels) for Q, K, softmax output, V. probabilities: nullptr, or where to write the
  // (quantized) softmax output. extremes: nullptr, or where its min and max go; then sample gets its elements at the
  // offset_count sorted flat positions ``offsets``. Returns 0.
  std::vector<float> worker_extremes(2 * std::max(threads, 1));
  Problem p{q, k, v, bias, mask, {}, {}, {}, bias_windows, mask_windows, batch, heads, tokens, dim, scale, {}, out,
            probabilities, offsets, offset_count, sample, extremes ? worker_extremes.data() : nullptr};
  std::copy(strides, strides + 4, p.qs);
  std::copy(strides + 4, strides + 8, p.ks);
  std::copy(strides + 8, strides + 12, p.vs);
  for (int t = 0; t < 4; ++t)
    p.quantizers[t] = quantizers ? Quantizer{quantizers[4 * t] != 0.0f, quantizers[4 * t + 1],
                                             quantizers[4 * t + 2], quantizers[4 * t + 3]}
                                 : Quantizer{false, 0.0f, 1.0f, 1.0f};
  const int64_t workers = split(batch * heads, threads, 1, [&](int64_t worker, int64_t first, int64_t last) {
    attend(p, worker, first, last);
  });
  if (extremes) combine_extremes(worker_extremes, workers, extremes);
  return 0;
}
