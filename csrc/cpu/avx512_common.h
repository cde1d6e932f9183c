// AVX-512 pieces shared by the VNNI and AMX int8 paths (torch-free: tests/backends/cpu/amx_emulation.cpp includes it):
// per-token quantization of one row and the dequantize + bias + cast store of 16 output columns.
//
// Both are written so that every ISA path gives bit-identical results:
//   quantize:  scale = absmax/127, inv = 1/scale, q = clamp(round_half_even(x*inv), -127, 127)
//              (the fp32 operations of reference.quantize_per_token, its edge rows included: quant_scale)
//   epilogue:  out = cast(fma(float(acc - comp), a_scale*w_scale, bias)), bf16/fp16 rounded to nearest even.
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace td_cpu {

#define TD_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni")))

enum class Dt { f32 = 0, bf16 = 1, f16 = 2, i8 = 3 };

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

inline __mmask16 tail_mask16(int64_t n) {
  return n >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << n) - 1u);
}

// 16 floats from fp32/bf16/fp16 (masked lanes read as 0).
TD_AVX512 inline __m512 load16(const void* x, Dt dt, __mmask16 m) {
  if (dt == Dt::f32) return _mm512_maskz_loadu_ps(m, x);
  const __m256i h = _mm256_maskz_loadu_epi16(m, x);
  if (dt == Dt::bf16) return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  return _mm512_cvtph_ps(h);
}

inline int dt_size(Dt dt) { return dt == Dt::f32 ? 4 : dt == Dt::i8 ? 1 : 2; }

// The row's absmax as the bits of |x| (sign cleared): as unsigned integers every NaN is above +inf, which is above
// every finite value, so an integer max propagates NaN (a float max would drop it).
inline uint32_t abs_bits(float f) {
  uint32_t u;
  __builtin_memcpy(&u, &f, 4);
  return u & 0x7fffffffu;
}

// Scale and inverse of a row from its absmax bits, with the edge rows of reference.quantize_per_token: absmax
// below TINY_ABSMAX = 127·2^-126 (bits 0x03fe0000; all-zero, subnormal and tiny rows) -> scale 0; a NaN row ->
// scale NaN; an inf row -> scale inf. Returns false for those rows, whose q is all zeros.
inline bool quant_scale(uint32_t amax_bits, float* scale, float* inv) {
  float amax;
  __builtin_memcpy(&amax, &amax_bits, 4);
  if (amax_bits < 0x03fe0000u) {
    *scale = 0.f, *inv = 0.f;
    return false;
  }
  *scale = amax / 127.0f;  // NaN / inf stay NaN / inf
  *inv = amax_bits < 0x7f800000u ? 1.0f / *scale : 0.f;
  return amax_bits < 0x7f800000u;
}

// One row x[0:K] (fp32/bf16/fp16) -> q[0:K] int8 and its scale; the same fp32 operations as the reference.
TD_AVX512 inline void quant_row_avx512(const void* x, Dt dt, int64_t K, int8_t* q, float* scale_out) {
  const char* xb = static_cast<const char*>(x);
  const int es = dt_size(dt);
  const __m512i absmask = _mm512_set1_epi32(0x7fffffff);
  __m512i amax = _mm512_setzero_si512();  // |x| bits, unsigned max: NaN propagates (see abs_bits)
  for (int64_t k = 0; k < K; k += 16)
    amax = _mm512_max_epu32(amax, _mm512_and_si512(_mm512_castps_si512(load16(xb + k * es, dt, tail_mask16(K - k))),
                                                   absmask));
  float scale, inv;
  if (!quant_scale(static_cast<uint32_t>(_mm512_reduce_max_epu32(amax)), &scale, &inv)) {
    for (int64_t k = 0; k < K; ++k) q[k] = 0;
    *scale_out = scale;
    return;
  }
  const __m512 vinv = _mm512_set1_ps(inv), lo = _mm512_set1_ps(-127.f), hi = _mm512_set1_ps(127.f);
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = tail_mask16(K - k);
    __m512 v = _mm512_mul_ps(load16(xb + k * es, dt, m), vinv);
    v = _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    v = _mm512_min_ps(hi, _mm512_max_ps(lo, v));
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
  }
  *scale_out = scale;
}

// 16 fp32 values to out (fp32/bf16/fp16), lanes outside `mask` untouched. bf16: round to nearest even on the
// bit pattern (NaN stays NaN: its payload sits in the high bits here), as vcvtne2ps2bf16 does.
TD_AVX512 inline void store16(void* out, Dt dt, __m512 v, __mmask16 mask) {
  if (dt == Dt::f32) {
    _mm512_mask_storeu_ps(out, mask, v);
  } else if (dt == Dt::bf16) {
    __m512i b = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
    b = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff))), 16);
    _mm256_mask_storeu_epi16(out, mask, _mm512_cvtepi32_epi16(b));
  } else {
    _mm256_mask_storeu_epi16(out, mask, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
}

// out[0:16] = fma(float(acc - comp), a_scale * ws, bias) for one row and 16 columns (ws, bias, comp: 16 lanes,
// zero padded past N so the loads need no mask).
TD_AVX512 inline void epilogue16(const int32_t* acc, const int32_t* comp, float a_scale, const float* ws,
                                 const float* bias, void* out, Dt dt, __mmask16 mask) {
  const __m512i a = _mm512_sub_epi32(_mm512_loadu_si512(acc), _mm512_loadu_si512(comp));
  const __m512 s = _mm512_mul_ps(_mm512_set1_ps(a_scale), _mm512_loadu_ps(ws));
  store16(out, dt, _mm512_fmadd_ps(_mm512_cvtepi32_ps(a), s, _mm512_loadu_ps(bias)), mask);
}

}  // namespace td_cpu
