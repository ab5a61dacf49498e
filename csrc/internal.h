/* Shared between run.c and matmul.c (not part of the cffi API). */
#ifndef PYLLAMA_INTERNAL_H
#define PYLLAMA_INTERNAL_H
#include <stdint.h>
#include "kernels.h"  /* includes pyllama.h, once */

/* Inside an OpenMP parallel region (or outside one, single-threaded): all threads of the team
 * call it together; ends with a barrier. scratch holds the quantized activations. */
void pl__team_matmul(float *xout, const float *x, const pl_tensor *w, void *scratch);

/* Activation scratch bytes one matmul with w needs. */
long long pl__act_bytes(const pl_tensor *w);

float pli_f16_to_f32(uint16_t h);

/* In place: x[i] = exp(x[i] - max) / sum (llama2.c's arithmetic; the sampler relies on it). */
void pli_softmax(float *x, int size);

#endif
