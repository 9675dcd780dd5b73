// Fused CUDA kernels for the CuPy backend of swav_ref.
//
// Each kernel does in one pass over memory what the plain array code does in several
// (each plain operation reads and writes a whole array and costs a kernel launch). The
// plain code in swav_ref.nn.functional, swav_ref.nn.optim and swav_ref.swav.codes stays
// the reference: the tests compare every kernel here against it.
//
// Conventions
// - Every kernel is element-wise: each output element is computed by one thread from its
//   inputs, with no atomics and no shared memory. A reduction (a sum over a channel, a
//   norm) is done before the kernel by the array library, and passed in as a vector.
// - Threads walk the output with a grid-stride loop, so any launch size covers any array.
//   The same property lets the test suite compile this very file as plain C++ (with
//   tests/cuda_host_shim.h) and run it on the CPU as one "thread" that visits every index.
// - T is float or double; I is the index type: int when the array has fewer than 2^31
//   elements (32-bit division is several times cheaper on a GPU), long long otherwise.
// - Every kernel is exported with C linkage as NAME_f32_i32, NAME_f32_i64, NAME_f64_i32,
//   NAME_f64_i64 (see SWAV_EXPORT at the bottom of each definition).
// - 4-d activations are stored channels first and batch last, (C, H, W, N) in memory;
//   see the module notes of swav_ref/nn/functional.py.

#define SWAV_GRID_STRIDE_LOOP(e, total)                                          \
    for (I e = (I)blockIdx.x * (I)blockDim.x + (I)threadIdx.x; e < (total);     \
         e += (I)blockDim.x * (I)gridDim.x)

#define SWAV_EXPORT(NAME, PARAMS, ARGS)                                          \
    extern "C" __global__ void NAME##_f32_i32 PARAMS(float, int) { NAME<float, int> ARGS; }                 \
    extern "C" __global__ void NAME##_f32_i64 PARAMS(float, long long) { NAME<float, long long> ARGS; }     \
    extern "C" __global__ void NAME##_f64_i32 PARAMS(double, int) { NAME<double, int> ARGS; }               \
    extern "C" __global__ void NAME##_f64_i64 PARAMS(double, long long) { NAME<double, long long> ARGS; }

// ---------------------------------------------------------------------------------------
// Convolution: im2col and its adjoint col2im, each one gather kernel
// ---------------------------------------------------------------------------------------

// cols[(c, i, j), (u, v, n)] = x[c, s u + i - p, s v + j - p, n], or 0 in the padding.
// x: (C, H, W, N) contiguous, unpadded. cols: (C KH KW, OH OW N) contiguous.
// Replaces a zero-padded copy of x and KH * KW strided slice copies.
template <typename T, typename I>
__device__ void im2col(const T* __restrict__ x, T* __restrict__ cols, I C, I H, I W, I N,
                       I KH, I KW, I stride, I pad, I OH, I OW) {
    const I total = C * KH * KW * OH * OW * N;
    SWAV_GRID_STRIDE_LOOP(e, total) {
        I r = e;
        const I n = r % N; r /= N;
        const I v = r % OW; r /= OW;
        const I u = r % OH; r /= OH;
        const I j = r % KW; r /= KW;
        const I i = r % KH;
        const I c = r / KH;
        const I h = stride * u + i - pad;
        const I w = stride * v + j - pad;
        const bool inside = h >= 0 && h < H && w >= 0 && w < W;
        cols[e] = inside ? x[((c * H + h) * W + w) * N + n] : (T)0;
    }
}
#define IM2COL_PARAMS(T, I) (const T* x, T* cols, I C, I H, I W, I N, I KH, I KW, I stride, I pad, I OH, I OW)
SWAV_EXPORT(im2col, IM2COL_PARAMS, (x, cols, C, H, W, N, KH, KW, stride, pad, OH, OW))

// dx[c, h, w, n] = sum of dcols[(c, i, j), (u, v, n)] over the windows (u, v) that saw
// pixel (h, w) at offset (i, j): h + p = s u + i and w + p = s v + j.
// Written as a gather (each thread owns one input pixel and sums its at most KH * KW
// contributions), so no two threads write the same place and no atomics are needed.
// dcols: (C KH KW, OH OW N) contiguous. dx: (C, H, W, N) contiguous.
template <typename T, typename I>
__device__ void col2im(const T* __restrict__ dcols, T* __restrict__ dx, I C, I H, I W, I N,
                       I KH, I KW, I stride, I pad, I OH, I OW) {
    const I total = C * H * W * N;
    SWAV_GRID_STRIDE_LOOP(e, total) {
        I r = e;
        const I n = r % N; r /= N;
        const I w = r % W; r /= W;
        const I h = r % H;
        const I c = r / H;
        T sum = (T)0;
        for (I i = 0; i < KH; ++i) {
            const I hu = h + pad - i;  // = s u for the window row u that covers h, if any
            if (hu < 0 || hu % stride != 0 || hu / stride >= OH) continue;
            const I u = hu / stride;
            for (I j = 0; j < KW; ++j) {
                const I wv = w + pad - j;
                if (wv < 0 || wv % stride != 0 || wv / stride >= OW) continue;
                const I v = wv / stride;
                sum += dcols[(((c * KH + i) * KW + j) * OH + u) * OW * N + v * N + n];
            }
        }
        dx[e] = sum;
    }
}
#define COL2IM_PARAMS(T, I) (const T* dcols, T* dx, I C, I H, I W, I N, I KH, I KW, I stride, I pad, I OH, I OW)
SWAV_EXPORT(col2im, COL2IM_PARAMS, (dcols, dx, C, H, W, N, KH, KW, stride, pad, OH, OW))

// ---------------------------------------------------------------------------------------
// Batch normalisation: the element-wise halves of the forward and the backward
// ---------------------------------------------------------------------------------------

// On the (C, M) matrix of channel rows, centred by the array code (which needs the
// centred values for the variance anyway), with invstd = 1 / sqrt(var + eps):
//   xhat = centred * invstd[c]  (in place),   y = xhat * weight[c] + bias[c].
// One read, two writes, instead of three passes and a temporary. (xhat is read and
// written by the same thread at the same index, so it is not __restrict__.)
template <typename T, typename I>
__device__ void batchnorm_scale_shift(T* xhat, const T* __restrict__ invstd,
                                      const T* __restrict__ weight, const T* __restrict__ bias,
                                      T* __restrict__ y, I C, I M) {
    SWAV_GRID_STRIDE_LOOP(e, C * M) {
        const I c = e / M;
        const T normalised = xhat[e] * invstd[c];
        xhat[e] = normalised;
        y[e] = normalised * weight[c] + bias[c];
    }
}
#define BN_FORWARD_PARAMS(T, I) (T* xhat, const T* invstd, const T* weight, const T* bias, T* y, I C, I M)
SWAV_EXPORT(batchnorm_scale_shift, BN_FORWARD_PARAMS, (xhat, invstd, weight, bias, y, C, M))

// The per-channel statistics after the reductions, in one launch over the C channels
// instead of four (a division, an addition, a square root and a reciprocal):
//   var[c] = sum_sq[c] / count,   invstd[c] = 1 / sqrt(var[c] + eps),
// where sum_sq[c] is the sum of the squared centred values of channel c.
template <typename T, typename I>
__device__ void batchnorm_variance(const T* __restrict__ sum_sq, T* __restrict__ var,
                                   T* __restrict__ invstd, I C, T count, T eps) {
    SWAV_GRID_STRIDE_LOOP(c, C) {
        const T v = sum_sq[c] / count;
        var[c] = v;
        invstd[c] = (T)1 / sqrt(v + eps);
    }
}
#define BN_VARIANCE_PARAMS(T, I) (const T* sum_sq, T* var, T* invstd, I C, T count, T eps)
SWAV_EXPORT(batchnorm_variance, BN_VARIANCE_PARAMS, (sum_sq, var, invstd, C, count, eps))

// The training-mode input gradient on the (C, M) rows, from the two channel sums
// (sum_dy = sum of g, sum_dy_xhat = sum of g * xhat over the channel's count values):
//   dx = (g - sum_dy[c] / count - xhat * (sum_dy_xhat[c] / count)) * weight[c] * invstd[c].
// The means and the scale are formed per element from per-channel vectors, which is cheaper
// on a GPU than three more launches to form them as vectors first. (Under sync-BN the
// caller passes the all-reduced means with count = 1.)
template <typename T, typename I>
__device__ void batchnorm_backward_input(const T* __restrict__ g, const T* __restrict__ xhat,
                                         const T* __restrict__ sum_dy,
                                         const T* __restrict__ sum_dy_xhat,
                                         const T* __restrict__ weight,
                                         const T* __restrict__ invstd, T* __restrict__ dx,
                                         I C, I M, T count) {
    SWAV_GRID_STRIDE_LOOP(e, C * M) {
        const I c = e / M;
        dx[e] = (g[e] - sum_dy[c] / count - xhat[e] * (sum_dy_xhat[c] / count)) * (weight[c] * invstd[c]);
    }
}
#define BN_BACKWARD_PARAMS(T, I) (const T* g, const T* xhat, const T* sum_dy, const T* sum_dy_xhat, const T* weight, const T* invstd, T* dx, I C, I M, T count)
SWAV_EXPORT(batchnorm_backward_input, BN_BACKWARD_PARAMS, (g, xhat, sum_dy, sum_dy_xhat, weight, invstd, dx, C, M, count))

// PyTorch's running-statistics rule for the C channels, into new arrays, in one launch
// instead of seven:
//   new_mean = keep * running_mean + momentum * mean,
//   new_var  = keep * running_var + momentum * var * unbias,  unbias = m / (m - 1),
// with keep = 1 - momentum computed on the host in double precision, as the plain code does
// (in float32 the subtraction can round differently by one unit in the last place).
template <typename T, typename I>
__device__ void batchnorm_running_update(const T* __restrict__ running_mean,
                                         const T* __restrict__ running_var,
                                         const T* __restrict__ mean, const T* __restrict__ var,
                                         T* __restrict__ new_mean, T* __restrict__ new_var, I C,
                                         T momentum, T keep, T unbias) {
    SWAV_GRID_STRIDE_LOOP(c, C) {
        new_mean[c] = keep * running_mean[c] + momentum * mean[c];
        new_var[c] = keep * running_var[c] + momentum * (var[c] * unbias);
    }
}
#define BN_RUNNING_PARAMS(T, I) (const T* running_mean, const T* running_var, const T* mean, const T* var, T* new_mean, T* new_var, I C, T momentum, T keep, T unbias)
SWAV_EXPORT(batchnorm_running_update, BN_RUNNING_PARAMS, (running_mean, running_var, mean, var, new_mean, new_var, C, momentum, keep, unbias))

// ---------------------------------------------------------------------------------------
// ReLU backward
// ---------------------------------------------------------------------------------------

// dx = g where the forward output y is positive, else 0 (0 at the kink, as PyTorch).
// One kernel instead of a comparison, a cast and a product.
template <typename T, typename I>
__device__ void relu_backward(const T* __restrict__ g, const T* __restrict__ y,
                              T* __restrict__ dx, I n) {
    SWAV_GRID_STRIDE_LOOP(e, n) { dx[e] = y[e] > (T)0 ? g[e] : (T)0; }
}
#define RELU_BACKWARD_PARAMS(T, I) (const T* g, const T* y, T* dx, I n)
SWAV_EXPORT(relu_backward, RELU_BACKWARD_PARAMS, (g, y, dx, n))

// ---------------------------------------------------------------------------------------
// Optimiser updates: one kernel per parameter tensor
// ---------------------------------------------------------------------------------------

// The end of every update, given the direction d of element e (PyTorch's SGD rule):
//   buf = d (first step) or momentum * buf + d;  p -= lr * buf.
// Without a buffer (momentum 0; buf is then a null pointer, never read) p -= lr * d.
template <typename T, typename I>
__device__ __forceinline__ void momentum_step(T* __restrict__ p, T* __restrict__ buf, I e, T d, T lr,
                                              T momentum, int first, int has_buffer) {
    if (!has_buffer) {
        p[e] -= lr * d;
        return;
    }
    const T b = first ? d : momentum * buf[e] + d;
    buf[e] = b;
    p[e] -= lr * b;
}

// SGD with momentum (PyTorch's semantics), in place on p and buf:
//   d = g + weight_decay * p;  buf = d (first step) or momentum * buf + d;  p -= lr * buf.
// With has_buffer == 0 (momentum 0) buf is not touched and p -= lr * d.
template <typename T, typename I>
__device__ void sgd_update(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf,
                           I n, T lr, T momentum, T weight_decay, int first, int has_buffer) {
    SWAV_GRID_STRIDE_LOOP(e, n) {
        const T d = g[e] + weight_decay * p[e];
        momentum_step(p, buf, e, d, lr, momentum, first, has_buffer);
    }
}
#define SGD_PARAMS(T, I) (T* p, const T* g, T* buf, I n, T lr, T momentum, T weight_decay, int first, int has_buffer)
SWAV_EXPORT(sgd_update, SGD_PARAMS, (p, g, buf, n, lr, momentum, weight_decay, first, has_buffer))

// LARS (apex LARC wrapping SGD), with the two sums of squares already reduced into
// 1-element arrays on the device (so nothing is read back to the host; the square roots
// are taken here, which saves two launches per parameter):
//   |p| = sqrt(p_sq_sum), |g| = sqrt(g_sq_sum),
//   alpha = trust * |p| / (|g| + weight_decay * |p| + eps),  d = alpha * (g + weight_decay * p)
// when both norms are positive, else d = g (LARC leaves such a gradient alone); then the
// momentum update of sgd_update with no further weight decay.
template <typename T, typename I>
__device__ void lars_update(T* __restrict__ p, const T* __restrict__ g, T* __restrict__ buf,
                            const T* __restrict__ p_sq_sum, const T* __restrict__ g_sq_sum, I n,
                            T lr, T momentum, T weight_decay, T trust, T eps, int first,
                            int has_buffer) {
    const T pn = sqrt(p_sq_sum[0]), gn = sqrt(g_sq_sum[0]);
    const bool usable = pn > (T)0 && gn > (T)0;
    const T alpha = usable ? trust * pn / (gn + weight_decay * pn + eps) : (T)1;
    const T decay = usable ? weight_decay : (T)0;
    SWAV_GRID_STRIDE_LOOP(e, n) {
        const T d = (g[e] + decay * p[e]) * alpha;
        momentum_step(p, buf, e, d, lr, momentum, first, has_buffer);
    }
}
#define LARS_PARAMS(T, I) (T* p, const T* g, T* buf, const T* p_sq_sum, const T* g_sq_sum, I n, T lr, T momentum, T weight_decay, T trust, T eps, int first, int has_buffer)
SWAV_EXPORT(lars_update, LARS_PARAMS, (p, g, buf, p_sq_sum, g_sq_sum, n, lr, momentum, weight_decay, trust, eps, first, has_buffer))

// ---------------------------------------------------------------------------------------
// SwAV's Sinkhorn-Knopp codes, on the (B, K) layout of the scores
// ---------------------------------------------------------------------------------------

// q[b, k] = exp((s[b, k] - shift[k]) * inv_eps): the shifted exponential in one pass
// instead of a subtraction, a scaling and an exp.
template <typename T, typename I>
__device__ void shifted_exp(const T* __restrict__ s, const T* __restrict__ shift,
                            T* __restrict__ q, I B, I K, T inv_eps) {
    SWAV_GRID_STRIDE_LOOP(e, B * K) { q[e] = exp((s[e] - shift[e % K]) * inv_eps); }
}
#define SHIFTED_EXP_PARAMS(T, I) (const T* s, const T* shift, T* q, I B, I K, T inv_eps)
SWAV_EXPORT(shifted_exp, SHIFTED_EXP_PARAMS, (s, shift, q, B, K, inv_eps))

// q[b, k] /= sums[k] * factor[0]: every prototype (a column here) scaled to a total mass,
// the scale computed in the kernel instead of a separate vector operation. factor is a
// 1-element device array (it may be an all-reduced count).
template <typename T, typename I>
__device__ void divide_columns(T* __restrict__ q, const T* __restrict__ sums,
                               const T* __restrict__ factor, I B, I K) {
    const T f = factor[0];
    SWAV_GRID_STRIDE_LOOP(e, B * K) { q[e] = q[e] / (sums[e % K] * f); }
}
#define DIVIDE_PARAMS(T, I) (T* q, const T* sums, const T* factor, I B, I K)
SWAV_EXPORT(divide_columns, DIVIDE_PARAMS, (q, sums, factor, B, K))

// q[b, k] /= sums[b] * factor[0]: every sample (a row here) scaled to a total mass.
template <typename T, typename I>
__device__ void divide_rows(T* __restrict__ q, const T* __restrict__ sums,
                            const T* __restrict__ factor, I B, I K) {
    const T f = factor[0];
    SWAV_GRID_STRIDE_LOOP(e, B * K) { q[e] = q[e] / (sums[e / K] * f); }
}
SWAV_EXPORT(divide_rows, DIVIDE_PARAMS, (q, sums, factor, B, K))
