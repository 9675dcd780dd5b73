# ---
# jupyter:
#   jupytext:
#     formats: py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 04 · A ResNet by hand: convolution, BatchNorm and their backward passes
#
# SwAV trains a ResNet. Here we build one from `swav_ref.nn`, where every layer is a pair
# of functions, `*_forward(x, ...) -> (out, cache)` and `*_backward(dout, cache)`, with
# the gradient derived on paper and checked against central differences. We go through
#
# 1. **im2col**: how a convolution becomes one matrix product;
# 2. the **convolution backward** pass, and why it is `col2im` of a matrix product;
# 3. the **BatchNorm backward** pass, in training and in eval mode;
# 4. the whole **ResNet**: gradient checks, crop-size groups, PyTorch as a referee;
# 5. a few steps of **training** on the digits, with SGD and the warm-up + cosine schedule.

# %%
import ast
import inspect
import os
import textwrap

import matplotlib.pyplot as plt
import numpy as np
from IPython.display import Code

import swav_ref.backend
from swav_ref import exercises
from swav_ref.nn import SGD, Linear, resnet_tiny, warmup_cosine_schedule
from swav_ref.nn import functional as F
from swav_ref.nn.gradcheck import check_gradient, check_gradient_sampled, projected_loss, rel_error

# "cupy" runs the same cells on a GPU; so does SWAV_REF_BACKEND=cupy in the environment
BACKEND = os.environ.get("SWAV_REF_BACKEND", "numpy")
xp = swav_ref.backend.get_backend(BACKEND)
to_numpy = swav_ref.backend.to_numpy
rng = np.random.default_rng(0)


def show_code(function):
    """The library's source of ``function``, highlighted, without its docstring (which the
    API page renders): the code is what this notebook reads."""
    source = textwrap.dedent(inspect.getsource(function))
    body = ast.parse(source).body[0].body
    lines = source.splitlines(keepends=True)
    if isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        del lines[body[0].lineno - 1 : body[0].end_lineno]
    return Code("".join(lines), language="python")


def on_backend(a, dtype="float64"):
    return swav_ref.backend.asarray(a, xp, dtype)


# %% [markdown]
# ## 1. im2col: a convolution is a matrix product
#
# A convolution with weight $W$ of shape $(O, C, k_h, k_w)$, stride $s$ and zero padding $p$
# computes, for every output pixel,
#
# $$y[n, o, u, v] = \sum_{c, i, j} W[o, c, i, j]\; x_\text{pad}[n, c, s u + i, s v + j].$$
#
# Collect, for every output pixel $(n, u, v)$, the $C k_h k_w$ input values its window sees
# into one **column**. The columns form a matrix $X_\text{col}$ of shape
# $(C k_h k_w,\; H_\text{out} W_\text{out} N)$ (columns ordered $(u, v, n)$: the batch
# index last, which lets the layers pass their outputs on without transposing), and with the weight flattened to
# $W_\text{mat}$ of shape $(O, C k_h k_w)$ the whole convolution is **one** matrix product
#
# $$Y = W_\text{mat}\, X_\text{col}.$$
#
# A tiny example: one 3x4 image, a 2x2 kernel, stride 1, no padding. Each column is one
# window, read row by row.

# %%
x_small = np.arange(12.0).reshape(1, 1, 3, 4)
cols = to_numpy(F.im2col(on_backend(x_small), (2, 2), stride=1, padding=0))
print("input:\n", x_small[0, 0])
print("columns (one per output pixel):\n", cols)

# %% [markdown]
# `im2col` never loops over pixels or images. For each of the $k_h k_w$ kernel offsets
# $(i, j)$ it copies one strided slice of the padded input, a whole (C, H_out, W_out, N)
# block at a time, into the rows $(c, i, j)$ of the column matrix. That is 9 copies for a
# 3x3 kernel, whatever the batch size.

# %%
show_code(F.im2col)

# %%
x = on_backend(rng.normal(size=(2, 3, 6, 5)))
weight = on_backend(rng.normal(size=(4, 3, 3, 3)))
bias = on_backend(rng.normal(size=(4,)))
out, cache = F.conv2d_forward(x, weight, bias, stride=2, padding=1)
direct = np.zeros(out.shape)  # the definition, with loops, on the host
xp_host = np.pad(to_numpy(x), ((0, 0), (0, 0), (1, 1), (1, 1)))
for u in range(out.shape[2]):
    for v in range(out.shape[3]):
        window = xp_host[:, :, 2 * u : 2 * u + 3, 2 * v : 2 * v + 3]
        direct[:, :, u, v] = np.einsum("ncij,ocij->no", window, to_numpy(weight)) + to_numpy(bias)
print("output shape", out.shape, "| rel_error vs the definition:", rel_error(out, direct))

# %% [markdown]
# The column matrix is large: 9 times the input for a 3x3 kernel. Drawn as an image it
# shows the nine shifted copies of the input stacked on top of each other (here one
# channel of one digit-sized image, so the pattern is easy to see).

# %%
digit = np.zeros((1, 1, 8, 8))
digit[0, 0, 1:7, 3:5] = 1.0
digit[0, 0, 1, 2] = 1.0
big_cols = to_numpy(F.im2col(on_backend(digit), (3, 3), stride=1, padding=1))
fig, axes = plt.subplots(1, 2, figsize=(9, 2.6), gridspec_kw={"width_ratios": [1, 6]})
axes[0].imshow(digit[0, 0], cmap="gray_r")
axes[0].set_title("input (8x8)")
axes[1].imshow(big_cols, cmap="gray_r", aspect="auto")
axes[1].set_title("im2col: 9 rows (kernel offsets) x 64 columns (output pixels)")
axes[1].set_xlabel("output pixel (u, v)")
axes[1].set_ylabel("offset (i, j)")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. The convolution backward pass
#
# With $G = \partial L / \partial Y$ reshaped to $(O, H_\text{out} W_\text{out} N)$, the
# matrix product $Y = W_\text{mat} X_\text{col}$ has the two familiar gradients
#
# $$\frac{\partial L}{\partial W_\text{mat}} = G\, X_\text{col}^\top, \qquad
#   \frac{\partial L}{\partial X_\text{col}} = W_\text{mat}^\top G, \qquad
#   \frac{\partial L}{\partial b_o} = \sum_{n,u,v} G[o, (u,v,n)].$$
#
# The last step goes from columns back to pixels. A pixel appears in up to $k_h k_w$
# windows, so its gradient is the **sum** of the gradients of all its copies: `col2im` adds
# each of the $k_h k_w$ slices back onto a zero image (`+=`), the exact transpose of the
# copying `im2col` did. "Transpose" can be checked numerically: for every $x$ and $G$,
#
# $$\langle \operatorname{im2col}(x), G \rangle = \langle x, \operatorname{col2im}(G) \rangle.$$

# %%
g_cols = on_backend(rng.normal(size=cache.cols.shape))
lhs = float(xp.sum(F.im2col(x, (3, 3), 2, 1) * g_cols))
rhs = float(xp.sum(x * F.col2im(g_cols, x.shape, (3, 3), 2, 1)))
print(f"<im2col(x), G> = {lhs:.12f}\n<x, col2im(G)> = {rhs:.12f}")

# %% [markdown]
# **Exercise (convolution backward).** Before reading the library's version, write your
# own, straight from the definition and with loops if you like: given `dout` $= G$
# (N, O, H_out, W_out), the input `x` (N, C, H, W), the `weight` (O, C, kh, kw), `stride` and
# `padding`, return `(dx, dweight, dbias)`. Every output pixel $(n, o, u, v)$ saw the window
# $x_\text{pad}[n, :, su : su + k_h, sv : sv + k_w]$, so it adds
# $G[n, o, u, v] \cdot \text{window}$ to `dweight[o]` and
# $G[n, o, u, v] \cdot W[o]$ to that window of `dx` (padded; cut the padding off at the
# end), and $G[n, o, u, v]$ to `dbias[o]`. The check uses stride 2 and padding 1 and
# compares with `F.conv2d_backward`.

# %%
def my_conv2d_backward(dout, x, weight, stride, padding):
    return None  # your code here


# %%
print(exercises.check_conv2d_backward(my_conv2d_backward))

# %% [markdown]
# The library's backward does the same work with one matrix product per gradient and
# `col2im`:

# %%
show_code(F.conv2d_backward)

# %% [markdown]
# **Gradient check.** For a random $R$, the loss $L = \sum Y \odot R$ has
# $\partial L / \partial Y = R$. Central differences in float64,
# $\frac{L(x + h e_i) - L(x - h e_i)}{2h}$, must agree with the analytic gradient to a
# relative error below $10^{-6}$ (they reach about $10^{-10}$).

# %%
r = on_backend(rng.normal(size=out.shape))
dx, dweight, dbias = F.conv2d_backward(r, cache)


def conv_loss():
    return float(xp.sum(F.conv2d_forward(x, weight, bias, stride=2, padding=1)[0] * r))


for name, array, grad in [("x", x, dx), ("weight", weight, dweight), ("bias", bias, dbias)]:
    print(f"conv2d d{name:6s} rel_error = {check_gradient(conv_loss, array, grad):.1e}")

# %% [markdown]
# ## 3. BatchNorm and its backward pass
#
# Batch normalisation (Ioffe & Szegedy, 2015) works per channel, over its $m = N H W$ values:
#
# $$\mu = \tfrac1m \textstyle\sum x, \quad \sigma^2 = \tfrac1m \sum (x - \mu)^2, \quad
#   \hat x = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}, \quad y = \gamma \hat x + \beta.$$
#
# **Eval mode** uses the running statistics, constants: $\partial L/\partial x =
# \gamma\, g / \sqrt{\sigma^2 + \epsilon}$ with $g = \partial L/\partial y$.
#
# **Training mode**: $\mu$ and $\sigma^2$ depend on every $x$ of the channel. Write
# $s = \sqrt{\sigma^2 + \epsilon}$ for the divisor, so $\hat x = (x - \mu)/s$. With
# $\partial \hat x_k / \partial x_j = \frac{1}{s}\big(\delta_{jk} - \frac1m -
# \frac1m \hat x_j \hat x_k\big)$ (from $\partial\mu/\partial x_j = 1/m$ and
# $\partial s/\partial x_j = \frac{1}{2s}\,\partial\sigma^2/\partial x_j
# = \frac{x_j - \mu}{m s} = \hat x_j / m$), the chain rule
# $\partial L/\partial x_j = \sum_k \gamma g_k\, \partial \hat x_k / \partial x_j$ collapses
# to two reductions:
#
# $$\begin{aligned}
# \frac{\partial L}{\partial x} &= \frac{\gamma}{\sqrt{\sigma^2+\epsilon}}
#   \Big(g - \frac1m \sum g - \hat x \cdot \frac1m \sum g \hat x\Big), \\
# \frac{\partial L}{\partial \gamma} &= \sum g \hat x, \qquad
#   \frac{\partial L}{\partial \beta} = \sum g.
# \end{aligned}$$
#
# The gradient loses its mean and its component along $\hat x$: shifting or scaling a
# channel's inputs does not change its normalised output. With synchronised BatchNorm the
# two sums run over every worker (one all-reduce), and the result is exactly the gradient
# of one big batch.
#
# **Exercise (BatchNorm backward).** Write the training-mode backward pass before you read
# the library's: given `dout` $= g$ and `x`, both (N, C, H, W), `gamma` (C,) and `eps`,
# return `(dx, dgamma, dbeta)`. Hint: recompute $\mu$, $\sigma^2$ and $\hat x$ per
# channel (reduce over the axes `(0, 2, 3)` with `keepdims=True`), then apply the three
# formulas above. The check compares with `F.batchnorm_backward` after a training-mode
# `F.batchnorm_forward`.

# %%
def my_batchnorm_backward(dout, x, gamma, eps):
    return None  # your code here


# %%
print(exercises.check_batchnorm_backward(my_batchnorm_backward))

# %% [markdown]
# The library's version works on the (C, N H W) matrix with one row per channel, so both
# sums are reductions along rows:

# %%
show_code(F.batchnorm_backward)

# %%
xb = on_backend(rng.normal(size=(4, 3, 3, 2)) * 2.0 + 1.0)
gamma = on_backend(rng.uniform(0.5, 1.5, size=3))
beta = on_backend(rng.normal(size=3))
running_mean, running_var = on_backend(np.zeros(3)), on_backend(np.ones(3))
for training in (True, False):
    yb, bn_cache = F.batchnorm_forward(xb, gamma, beta, running_mean, running_var, training=training)
    rb = on_backend(rng.normal(size=yb.shape))
    grads = F.batchnorm_backward(rb, bn_cache)

    def bn_loss(training=training, rb=rb):
        return float(xp.sum(F.batchnorm_forward(xb, gamma, beta, running_mean, running_var, training=training)[0] * rb))

    errors = [check_gradient(bn_loss, a, g) for a, g in zip((xb, gamma, beta), grads)]
    print(f"training={training!s:5s} rel_error dx {errors[0]:.1e}  dgamma {errors[1]:.1e}  dbeta {errors[2]:.1e}")

# %% [markdown]
# What the training-mode backward removes: project the incoming gradient of one channel
# onto $(1, \hat x)$. What is left is orthogonal to both, which the plot shows as a
# zero mean and a flat trend against $\hat x$.

# %%
yb, bn_cache = F.batchnorm_forward(xb, gamma, beta)
xhat = (to_numpy(yb) - to_numpy(beta)[None, :, None, None]) / to_numpy(gamma)[None, :, None, None]
rb = on_backend(rng.normal(size=yb.shape) + 0.8 * xhat + 0.5)  # a gradient with a mean and an x-hat part
dxb = to_numpy(F.batchnorm_backward(rb, bn_cache)[0])
xhat0 = xhat[:, 0].ravel()
fig, ax = plt.subplots(figsize=(5, 3.2))
ax.scatter(xhat0, to_numpy(rb)[:, 0].ravel(), label=r"incoming $g$", alpha=0.7)
ax.scatter(xhat0, dxb[:, 0].ravel(), label=r"$\partial L/\partial x$", alpha=0.7)
ax.axhline(0, color="gray", lw=0.5)
ax.set_xlabel(r"$\hat x$ (channel 0)")
ax.legend()
ax.set_title("BatchNorm backward removes the mean and the $\\hat x$ component")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. The whole network
#
# `resnet_tiny` (16-32-64 channels, one `BasicBlock` per stage) is the digits backbone:
# a 3x3 stem, no max-pool, stride 2 from the second stage on, global average pooling, and
# features of dimension `out_dim = 64`. Parameter names follow torchvision.

# %%
net = resnet_tiny(in_channels=1, rng=0, xp=xp, dtype="float64")
print(net)
print(f"{net.num_parameters()} parameters; first names:", [n for n, _, _ in net.named_parameters()][:6])

# %% [markdown]
# A gradient check of the whole network, in training mode, for the input and **every**
# parameter tensor. Perturbing all 77k weights one by one would take too long, so
# `check_gradient_sampled` checks 5 random entries of each tensor.

# %%
images = on_backend(rng.normal(size=(2, 1, 8, 8)))
features = net.forward(images)
r = on_backend(rng.normal(size=features.shape))
net.zero_grad()
dimages = net.backward(r)

net_loss = projected_loss(net, images, r)  # sum(net(images) * r), whose gradient in the output is r

names, errors = [], []
for name, owner, key in net.named_parameters():
    names.append(name)
    errors.append(check_gradient_sampled(net_loss, owner.params[key], owner.grads[key], samples=5, seed=len(name)))
print(f"input: rel_error {check_gradient_sampled(net_loss, images, dimages, samples=5):.1e}")
print(f"parameters: worst rel_error {max(errors):.1e} over {len(errors)} tensors")

fig, ax = plt.subplots(figsize=(9, 3))
ax.bar(range(len(errors)), errors)
ax.axhline(1e-6, color="red", ls="--", label="bound 1e-6")
ax.set_yscale("log")
ax.set_xticks(range(len(names)), names, rotation=90, fontsize=6)
ax.set_ylabel("rel_error")
ax.set_title("resnet_tiny, float64: analytic vs central differences")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# **Several forwards, then the backwards in reverse.** SwAV sends each crop size through the
# network as one batch. A layer in training mode pushes its cache on a stack; `backward`
# pops the newest and *adds* to the gradients. So `forward_groups` / `backward_groups`
# behave like autograd over two forward passes: the parameter gradients are the sums.

# %%
big, small = on_backend(rng.normal(size=(3, 1, 8, 8))), on_backend(rng.normal(size=(5, 1, 4, 4)))
feats = net.forward_groups([big, small])
print("pending caches after two forwards:", net.num_pending())
net.zero_grad()
net.backward_groups([on_backend(np.ones(f.shape)) for f in feats])
print("pending caches after the backwards:", net.num_pending())
net.eval()
_ = net.forward(big)
print("after an eval-mode forward:", net.num_pending(), "(eval stores nothing)")
net.train()

# %% [markdown]
# **PyTorch as a referee** (skipped when PyTorch is not installed): the same architecture
# in PyTorch, loaded with our weights through the state dict, must give the same features
# and the same gradients to float64 round-off.

# %%
try:
    import torch
except ImportError:
    torch = None
    print("PyTorch is not installed: skipping the comparison")

if torch is not None:
    tnn = torch.nn

    class TorchBlock(tnn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1 = tnn.Conv2d(cin, cout, 3, stride, 1, bias=False), tnn.BatchNorm2d(cout)
            self.conv2, self.bn2 = tnn.Conv2d(cout, cout, 3, 1, 1, bias=False), tnn.BatchNorm2d(cout)
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = tnn.Sequential(tnn.Conv2d(cin, cout, 1, stride, bias=False), tnn.BatchNorm2d(cout))

        def forward(self, t):
            out = self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(t)))))
            return torch.relu(out + (t if self.downsample is None else self.downsample(t)))

    class TorchTiny(tnn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = tnn.Conv2d(1, 16, 3, 1, 1, bias=False), tnn.BatchNorm2d(16)
            self.layer1 = tnn.Sequential(TorchBlock(16, 16, 1))
            self.layer2 = tnn.Sequential(TorchBlock(16, 32, 2))
            self.layer3 = tnn.Sequential(TorchBlock(32, 64, 2))

        def forward(self, t):
            t = torch.relu(self.bn1(self.conv1(t)))
            return self.layer3(self.layer2(self.layer1(t))).mean(dim=(2, 3))

    referee = TorchTiny().double()
    referee.load_state_dict({k: torch.tensor(to_numpy(v)) for k, v in net.state_dict().items()})
    timages = torch.tensor(to_numpy(images), requires_grad=True)
    tfeatures = referee(timages)
    tfeatures.backward(torch.tensor(to_numpy(r)))
    net.zero_grad()
    ours = net.forward(images)
    dours = net.backward(r)
    tgrads = dict(referee.named_parameters())
    worst = max(rel_error(o.grads[k], tgrads[n].grad.numpy()) for n, o, k in net.named_parameters())
    print(f"features rel_error {rel_error(ours, tfeatures.detach().numpy()):.1e}")
    print(f"input gradient rel_error {rel_error(dours, timages.grad.numpy()):.1e}")
    print(f"worst parameter gradient rel_error {worst:.1e}")

# %% [markdown]
# ## 5. It learns: a few steps on the digits
#
# Supervised, to see the kit work end to end: `resnet_tiny` + a linear classifier +
# softmax cross-entropy on scikit-learn's 8x8 digits, SGD with momentum, a short linear
# warm-up then a cosine decay of the learning rate (the schedule SwAV uses).

# %%
from sklearn.datasets import load_digits  # noqa: E402

digits = load_digits()
images_all = (digits.images / 16.0 - 0.5).astype(np.float32)[:, None]
labels_all = digits.target

model = resnet_tiny(in_channels=1, rng=0, xp=xp, dtype="float32")
head = Linear(model.out_dim, 10, rng=1, xp=xp, dtype="float32")
optimisers = [SGD(model, momentum=0.9, weight_decay=5e-4), SGD(head, momentum=0.9, weight_decay=5e-4)]
train_idx, test_idx = rng.permutation(len(labels_all))[:-300], None
test_idx = np.setdiff1d(np.arange(len(labels_all)), train_idx)  # 300 images never trained on
steps, batch = 60, 128
history, rates = [], []
for step in range(steps):
    idx = rng.choice(train_idx, size=batch, replace=False)
    xb_train = on_backend(images_all[idx], "float32")
    yb_train = swav_ref.backend.asarray(labels_all[idx], xp, "int64")
    loss, loss_cache = F.softmax_cross_entropy_forward(head.forward(model.forward(xb_train)), yb_train)
    model.backward(head.backward(F.softmax_cross_entropy_backward(1.0, loss_cache)))
    lr = warmup_cosine_schedule(step, steps, base_lr=0.1, final_lr=0.001, warmup_steps=5)
    for opt in optimisers:
        opt.step(lr)
    model.zero_grad()
    head.zero_grad()
    history.append(float(loss))  # logging is the one place a value leaves the device
    rates.append(lr)

model.eval()
test_logits = head.forward(model.forward(on_backend(images_all[test_idx], "float32")))
accuracy = float(np.mean(np.argmax(to_numpy(test_logits), axis=1) == labels_all[test_idx]))
print(f"final training loss {history[-1]:.3f}; accuracy on {len(test_idx)} held-out digits {accuracy:.2f}")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3))
ax1.plot(history)
ax1.set_xlabel("step")
ax1.set_ylabel("cross-entropy")
ax1.set_title("training loss")
ax2.plot(rates)
ax2.set_xlabel("step")
ax2.set_title("warm-up + cosine learning rate")
plt.tight_layout()
plt.show()

# %% [markdown]
# Sixty supervised steps are a sanity check that the pieces fit together, not an
# evaluation; the linear probe and kNN on SwAV features come in later notebooks.
#
# **Where next.** Notebook 05 puts SwAV's head and swapped-prediction loss on top of this
# backbone. The benchmark `benchmarks/bench_resnet.py` times a full training step of
# `resnet18` against PyTorch and says where the time goes (im2col, the GEMMs, BatchNorm).
