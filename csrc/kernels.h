/* Internal interface between the C files (not part of the cffi API; never read by cffi).
 *
 * matmul.c  — dispatch on the tensor type, OpenMP row split, F32/F16/BF16 kernels
 * quants.c  — block-quantized types (ggml Q4_0 … Q6_K, llama2.c V2 PL_Q8_G): activation
 *             quantization, row dot products, dequantization; scalar code plus AVX2 paths
 */
#ifndef PYLLAMA_KERNELS_H
#define PYLLAMA_KERNELS_H
#include <stddef.h>
#include <stdint.h>
#include "pyllama.h"

/* 1 for the types quants.c handles, else 0. */
int pli_is_quant(int type);

/* Bytes of activation scratch that pli_quantize_act needs for an input of w->cols elements. */
long long pli_act_bytes(const pl_tensor *w);

/* Quantize x[w->cols] into the activation format pli_matvec_rows reads for w's type. */
void pli_quantize_act(const pl_tensor *w, const float *x, void *xq);

/* out[r] = dot(row r of w, x) for r in [r0, r1), x given as quantized by pli_quantize_act.
 * Called from inside an OpenMP region (one call per thread chunk): no OpenMP inside. */
void pli_matvec_rows(const pl_tensor *w, const void *xq, float *out, long long r0, long long r1);

/* out[w->cols] = row `row` of w, dequantized. */
void pli_dequantize_row(const pl_tensor *w, long long row, float *out);

#endif
