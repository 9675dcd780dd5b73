// Compile swav_ref/fused/kernels.cu as plain C++ for the CPU, to test the kernels' index
// arithmetic and formulas without a GPU (tests/test_fused_kernels.py).
//
// A launch becomes a single "thread" (block 0, thread 0, one block of one thread): each
// kernel's grid-stride loop then visits every element in order. The CUDA qualifiers are
// dropped; the math functions come from the C library, as on the device.
#include <math.h>

#define __global__
#define __device__
#define __forceinline__ inline

struct swav_host_dim3 {
    unsigned x, y, z;
};
static const swav_host_dim3 threadIdx = {0, 0, 0};
static const swav_host_dim3 blockIdx = {0, 0, 0};
static const swav_host_dim3 blockDim = {1, 1, 1};
static const swav_host_dim3 gridDim = {1, 1, 1};
