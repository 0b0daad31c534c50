// The residual-MLP node (mlpmixer.fused.residual_mlp) as one torch operator, an autograd function in
// C++, so a step spends no Python between, or inside, the node's forward and backward (issue 17: at the
// MLM seed configuration that Python was most of the node's fixed cost). Each body makes the same calls
// in the same order as fused.py's Python bodies (the same ATen operators, the same compiled kernels of
// kernels.c, the same draws from torch's generator), so the results are the same bit for bit; fused.py
// keeps the Python bodies for where this library is not built, and the tests hold the two equal.
// mlpmixer/node.py builds this file on first use and hands it the kernels' addresses (set_kernels).
#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <cstdint>
#include <mutex>
#include <string>
#include <vector>

namespace {

using at::Tensor;

// the C kernels, in the order node.py passes their addresses (names as in kernels.c)
enum Kernel {
    LN_F32, LN_BF16, LN_BACKWARD_F32, LN_BACKWARD_BF16, DROPOUT_BIAS_F32, DROPOUT_BIAS_BF16,
    DROPOUT_ADD_BIAS_F32, DROPOUT_ADD_BIAS_F32_BF16, DROPOUT_MUL_SUM_F32, DROPOUT_MUL_SUM_F32_BF16, GELU_BF16,
    GELU_BACKWARD_BF16, GELU_BACKWARD_SUM_BF16, TO_BF16, TO_F32, KERNELS
};
using LayerNormFn = void (*)(void *, float *, float *, const float *, const float *, const float *, int64_t,
                             int64_t, float, int);
using LayerNormBackwardFn = void (*)(float *, float *, float *, float *, const void *, const float *, const float *,
                                     const float *, const float *, const float *, int64_t, int64_t, int);
using DropoutBiasFn = void (*)(void *, const void *, int64_t, int64_t, int, uint64_t, uint32_t, float, int);
using DropoutAddBiasFn = void (*)(float *, const float *, const void *, const void *, int64_t, int64_t, int, uint64_t,
                                  uint32_t, float, int);
using DropoutMulSumFn = void (*)(void *, float *, float *, const float *, int64_t, int64_t, int, uint64_t, uint32_t,
                                 float, int);
using GeluFn = void (*)(void *, const void *, int64_t, const void *, int);
using GeluBackwardFn = void (*)(void *, const void *, const void *, int64_t, const float *, int);
using GeluBackwardSumFn = void (*)(void *, float *, float *, const void *, const void *, int64_t, int64_t, int,
                                   const float *, int);
using CastFn = void (*)(void *, const void *, int64_t, float, int);

std::vector<void *> kernels;  // filled by set_kernels
Tensor gelu_value, gelu_slope;  // kernels.gelu_tables()
constexpr int64_t CHUNK_ROWS = 64;  // kernels.c's CHUNK

template <typename Fn>
Fn kernel(Kernel k) {
    TORCH_CHECK(static_cast<int64_t>(kernels.size()) == KERNELS, "mlpmixer: set_kernels was not called");
    return reinterpret_cast<Fn>(kernels[k]);
}

int threads() { return at::get_num_threads(); }
bool bf16(const Tensor &t) { return t.scalar_type() == at::kBFloat16; }

// kernels.new_key: one 64-bit draw from torch's default generator, the draw its full-range `random_` makes
// (there: an int64 tensor's one value), without the tensor
uint64_t new_key() {
    at::Generator gen = at::detail::getDefaultCPUGenerator();
    std::lock_guard<std::mutex> lock(gen.mutex());
    return gen.get<at::CPUGeneratorImpl>()->random64();
}

// a Python number as an operand: a 0-dim double tensor marked as a wrapped number, so `t * v` and
// `t.mul_(v)` compute as Python's do (the Scalar overloads round v to t's dtype first under bfloat16)
Tensor number(double v) {
    Tensor t = at::scalar_tensor(v, at::kDouble);
    t.unsafeGetTensorImpl()->set_wrapped_number(true);
    return t;
}

// t (float32) in bfloat16 and times `scale` (W2 with its hidden dropout's scale), rounded as torch's cast and
// bfloat16 product round them (fused._cast, then `w2 * scale`): kernels.c's one pass, no dispatch
Tensor to_bf16(const Tensor &t, double scale = 1.0) {
    if (t.scalar_type() == at::kFloat && t.is_contiguous() && t.device().is_cpu()) {
        Tensor out = at::empty(t.sizes(), t.options().dtype(at::kBFloat16));
        kernel<CastFn>(TO_BF16)(out.data_ptr(), t.data_ptr(), t.numel(), static_cast<float>(scale), threads());
        return out;
    }
    const Tensor out = t.to(at::kBFloat16);
    return scale == 1.0 ? out : out * number(scale);
}

// a gradient g in the parameter's dtype, after (scale != 1) `g.mul_(scale)` in g's dtype (W2's gradient: W2
// entered the product as W2 · scale); a bfloat16 g to float32 by kernels.c's one pass
Tensor to_dtype(Tensor g, at::ScalarType dtype, double scale = 1.0) {
    if (g.scalar_type() == at::kBFloat16 && dtype == at::kFloat && g.is_contiguous() && g.device().is_cpu()) {
        Tensor out = at::empty(g.sizes(), g.options().dtype(at::kFloat));
        kernel<CastFn>(TO_F32)(out.data_ptr(), g.data_ptr(), g.numel(), static_cast<float>(scale), threads());
        return out;
    }
    if (scale != 1.0) g.mul_(number(scale));
    return g.to(dtype);
}

// the scale a dropout applies: its 1 / (1 - p) where it drops anything (threshold > 0), else none
double applied_scale(int64_t threshold, double scale) { return threshold == 0 ? 1.0 : scale; }

// fused.dropped_value (float16 never reaches this node)
float dropped_value() { return -1.0e9f; }

// kernels.layer_norm
std::tuple<Tensor, Tensor, Tensor> layer_norm(const Tensor &x, const Tensor &w, const Tensor &b, double eps,
                                              at::ScalarType dtype) {
    const int64_t d = x.size(-1), rows = x.numel() / d;
    TORCH_CHECK(x.is_contiguous() && x.scalar_type() == at::kFloat && d % 16 == 0,
                "mlpmixer: the node takes a contiguous float32 x whose last axis is a multiple of 16 (fused.fusable)");
    Tensor y = at::empty(x.sizes(), x.options().dtype(dtype));
    Tensor mean = at::empty({rows}, x.options()), rstd = at::empty({rows}, x.options());
    const Tensor wc = w.contiguous(), bc = b.contiguous();
    kernel<LayerNormFn>(dtype == at::kBFloat16 ? LN_BF16 : LN_F32)(
        y.data_ptr(), mean.data_ptr<float>(), rstd.data_ptr<float>(), x.data_ptr<float>(), wc.data_ptr<float>(),
        bc.data_ptr<float>(), rows, d, static_cast<float>(eps), threads());
    return {y, mean, rstd};
}

// kernels.layer_norm_backward, with the residual's gradient added
std::tuple<Tensor, Tensor, Tensor> layer_norm_backward(const Tensor &dy_, const Tensor &x, const Tensor &mean,
                                                       const Tensor &rstd, const Tensor &w, const Tensor &residual) {
    const int64_t d = x.size(-1), rows = x.numel() / d;
    const Tensor dy = dy_.contiguous(), res = residual.contiguous(), wc = w.contiguous();
    Tensor dx = at::empty(x.sizes(), x.options()), dw = at::empty({d}, x.options()), db = at::empty({d}, x.options());
    Tensor part = at::empty({(rows + CHUNK_ROWS - 1) / CHUNK_ROWS, 2, d}, x.options());
    kernel<LayerNormBackwardFn>(bf16(dy) ? LN_BACKWARD_BF16 : LN_BACKWARD_F32)(
        dx.data_ptr<float>(), dw.data_ptr<float>(), db.data_ptr<float>(), part.data_ptr<float>(), dy.data_ptr(),
        res.data_ptr<float>(), x.data_ptr<float>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
        wc.data_ptr<float>(), rows, d, threads());
    return {dx, dw, db};
}

// fused.ACT_FORWARD, and fused._forward's bfloat16 GELU by table
Tensor act_forward(const std::string &activation, const Tensor &h) {
    if (activation == "gelu" && bf16(h)) {
        const Tensor hc = h.contiguous();
        Tensor out = at::empty_like(hc);
        kernel<GeluFn>(GELU_BF16)(out.data_ptr(), hc.data_ptr(), hc.numel(), gelu_value.data_ptr(), threads());
        return out;
    }
    if (activation == "gelu") return at::gelu(h);
    if (activation == "gelu_tanh") return at::gelu(h, "tanh");
    if (activation == "relu") return at::relu(h);
    TORCH_CHECK(activation == "silu", "mlpmixer: unknown activation ", activation);
    return at::silu(h);
}

// fused._backward_: σ'(h)·g written over g, and its sums over each row (left) or column
std::tuple<Tensor, Tensor> act_backward_(const std::string &activation, Tensor g, const Tensor &h, bool left) {
    if (activation == "gelu" && bf16(h) && g.is_contiguous()) {
        const Tensor hc = h.contiguous();
        if (g.size(1) % 16 == 0) {
            const int64_t rows = g.size(0), cols = g.size(1);
            Tensor sums = at::empty({left ? rows : cols}, h.options().dtype(at::kFloat));
            Tensor part = at::empty({left ? 0 : (rows + CHUNK_ROWS - 1) / CHUNK_ROWS * cols}, sums.options());
            kernel<GeluBackwardSumFn>(GELU_BACKWARD_SUM_BF16)(g.data_ptr(), sums.data_ptr<float>(),
                                                             part.data_ptr<float>(), g.data_ptr(), hc.data_ptr(), rows,
                                                             cols, left, gelu_slope.data_ptr<float>(), threads());
            return {g, sums};
        }
        kernel<GeluBackwardFn>(GELU_BACKWARD_BF16)(g.data_ptr(), g.data_ptr(), hc.data_ptr(), hc.numel(),
                                                   gelu_slope.data_ptr<float>(), threads());
    } else if (activation == "gelu") {
        at::gelu_backward_out(g, g, h);
    } else if (activation == "gelu_tanh") {
        at::gelu_backward_out(g, g, h, "tanh");
    } else if (activation == "relu") {
        at::threshold_backward_out(g, g, h, 0);
    } else {
        at::silu_backward_out(g, g, h);
    }
    return {g, g.sum(left ? 1 : 0)};
}

// fused._ResidualMlp.forward with fused._mlp_forward inside: x (N, B, D) float32. Returns the output,
// the tensors backward needs (x, norm weight, mean, rstd, the MLP's input, W1, W2·scale, h[, σ(h)]) and
// the branch dropout's key.
std::tuple<Tensor, std::vector<Tensor>, int64_t> residual_forward(
        const Tensor &x, const Tensor &norm_w, const Tensor &norm_b, const Tensor &w1_, const Tensor &b1_,
        const Tensor &w2_, const Tensor &b2_, double eps, const std::string &activation, bool left, bool autocast_bf16,
        int64_t hidden_threshold, double hidden_scale, int64_t branch_threshold, double branch_scale, bool keep) {
    const int64_t n = x.size(0), d = x.size(-1);
    const at::ScalarType dtype = autocast_bf16 ? at::kBFloat16 : x.scalar_type();
    auto [u_, mean, rstd] = layer_norm(x, norm_w, norm_b, eps, dtype);
    const Tensor u = left ? u_.view({n, -1}) : u_.view({-1, d});
    // fused._cast: autocast's dtype for the products; W2 enters as W2 · scale (see Dropout.biased)
    const double scale = applied_scale(hidden_threshold, hidden_scale);
    const Tensor w1 = autocast_bf16 ? to_bf16(w1_) : w1_, b1 = autocast_bf16 ? to_bf16(b1_) : b1_;
    const Tensor b2 = autocast_bf16 ? to_bf16(b2_) : b2_;
    const Tensor w2s = autocast_bf16 ? to_bf16(w2_, scale) : scale == 1.0 ? w2_ : w2_ * number(scale);
    Tensor h;
    if (hidden_threshold == 0) {
        h = left ? at::addmm(b1.unsqueeze(1), w1, u) : at::addmm(b1, u, w1.t());
    } else {  // Dropout.biased: a fresh full-size bias with dropped units pushed to where σ is flat zero
        const Tensor bc = b1.contiguous();
        const int64_t rows = left ? w1.size(0) : u.size(0), cols = left ? u.size(1) : w1.size(0);
        h = at::empty({rows, cols}, bc.options());
        const uint64_t key = new_key();
        kernel<DropoutBiasFn>(bf16(bc) ? DROPOUT_BIAS_BF16 : DROPOUT_BIAS_F32)(
            h.data_ptr(), bc.data_ptr(), rows, cols, left, key, static_cast<uint32_t>(hidden_threshold),
            dropped_value(), threads());
        if (left) h.addmm_(w1, u); else h.addmm_(u, w1.t());
    }
    const Tensor g = act_forward(activation, h);
    const Tensor y = left ? at::mm(w2s, g) : at::mm(g, w2s.t());  // b2 joins in the residual pass
    // kernels.dropout_add_bias: x + (y + b2) · scale where kept (nothing dropped without branch dropout)
    const uint64_t key = branch_threshold == 0 ? 0 : new_key();
    const int64_t branch_key = static_cast<int64_t>(key);
    const Tensor b2c = b2.contiguous();
    Tensor out = at::empty_like(x);
    kernel<DropoutAddBiasFn>(bf16(y) ? DROPOUT_ADD_BIAS_F32_BF16 : DROPOUT_ADD_BIAS_F32)(
        out.data_ptr<float>(), x.data_ptr<float>(), y.data_ptr(), b2c.data_ptr(), y.size(0), y.size(1), left, key,
        static_cast<uint32_t>(branch_threshold), static_cast<float>(applied_scale(branch_threshold, branch_scale)),
        threads());
    std::vector<Tensor> saved{x, norm_w, mean, rstd, u, w1, w2s, h};
    if (keep) saved.push_back(g);
    return {out, saved, branch_key};
}

// fused._ResidualMlp.backward with fused._mlp_backward inside: the gradients of x, the norm's weight and
// bias, W1, b1, W2 and b2, the last four in `grad_dtype` (the parameters' dtype); the scales are the ones
// the forward applied (applied_scale)
std::vector<Tensor> residual_backward(const Tensor &dout_, const std::vector<Tensor> &saved,
                                      const std::string &activation, bool left, double hidden_scale,
                                      int64_t branch_threshold, double branch_scale, int64_t branch_key,
                                      at::ScalarType grad_dtype) {
    const Tensor &x = saved[0], &norm_w = saved[1], &mean = saved[2], &rstd = saved[3];
    const Tensor &u = saved[4], &w1 = saved[5], &w2s = saved[6], &h = saved[7];
    const bool kept = saved.size() > 8;
    const int64_t n = x.size(0), d = x.size(-1);
    const Tensor dout = dout_.contiguous();
    // kernels.dropout_mul_sum: the branch's gradient (the forward mask made again from its key; nothing
    // dropped without branch dropout) in the products' dtype, and b2's gradient in the same pass
    const int64_t rows = left ? n : dout.numel() / d, cols = dout.numel() / rows;
    Tensor dy = at::empty({rows, cols}, dout.options().dtype(h.scalar_type()));
    Tensor db2 = at::empty({left ? rows : cols}, dout.options());
    Tensor part = at::empty({left ? 0 : (rows + CHUNK_ROWS - 1) / CHUNK_ROWS * cols}, dout.options());
    kernel<DropoutMulSumFn>(bf16(dy) ? DROPOUT_MUL_SUM_F32_BF16 : DROPOUT_MUL_SUM_F32)(
        dy.data_ptr(), db2.data_ptr<float>(), part.data_ptr<float>(), dout.data_ptr<float>(), rows, cols, left,
        static_cast<uint64_t>(branch_key), static_cast<uint32_t>(branch_threshold), static_cast<float>(branch_scale),
        threads());
    const Tensor g = kept ? saved[8] : act_forward(activation, h);
    const Tensor dw2 = left ? at::mm(dy, g.t()) : at::mm(dy.t(), g);  // times the scale at the end
    Tensor buf = kept ? at::empty_like(g) : g;  // see fused._mlp_backward
    if (left) at::mm_out(buf, w2s.t(), dy); else at::mm_out(buf, dy, w2s);
    auto [dh, db1] = act_backward_(activation, buf, h, left);
    const Tensor dw1 = left ? at::mm(dh, u.t()) : at::mm(dh.t(), u);
    const Tensor du = left ? at::mm(w1.t(), dh) : at::mm(dh, w1);
    auto [dx, dnorm_w, dnorm_b] = layer_norm_backward(du.view(x.sizes()), x, mean, rstd, norm_w, dout);
    return {dx, dnorm_w, dnorm_b, to_dtype(dw1, grad_dtype), to_dtype(db1, grad_dtype),
            to_dtype(dw2, grad_dtype, hidden_scale), to_dtype(db2, grad_dtype)};
}

// The node as an autograd function in C++ (fused._ResidualMlp's part where this library is built): no
// Python between the forward, the graph and the backward. The forward runs without autocast, as
// fused.residual_mlp runs _ResidualMlp (the bodies cast for themselves), and the backward, like
// once_differentiable's, is not itself differentiable.
struct ResidualMlp : public torch::autograd::Function<ResidualMlp> {
    static Tensor forward(torch::autograd::AutogradContext *ctx, const Tensor &x, const Tensor &norm_w,
                          const Tensor &norm_b, const Tensor &w1, const Tensor &b1, const Tensor &w2, const Tensor &b2,
                          double eps, const std::string &activation, bool left, bool autocast_bf16,
                          int64_t hidden_threshold, double hidden_scale, int64_t branch_threshold, double branch_scale,
                          bool keep) {
        auto [out, saved, key] = [&] {
            at::AutoDispatchBelowADInplaceOrView below_autograd;  // as in backward (below)
            return residual_forward(x, norm_w, norm_b, w1, b1, w2, b2, eps, activation, left, autocast_bf16,
                                    hidden_threshold, hidden_scale, branch_threshold, branch_scale, keep);
        }();
        ctx->save_for_backward(saved);
        ctx->saved_data["activation"] = activation;
        ctx->saved_data["left"] = left;
        // the scales the forward applied (none where nothing is dropped), for the backward to apply again
        ctx->saved_data["hidden_scale"] = applied_scale(hidden_threshold, hidden_scale);
        ctx->saved_data["branch_threshold"] = branch_threshold;
        ctx->saved_data["branch_scale"] = applied_scale(branch_threshold, branch_scale);
        ctx->saved_data["branch_key"] = key;
        ctx->saved_data["grad_dtype"] = static_cast<int64_t>(w1.scalar_type());
        return out;
    }

    static torch::autograd::variable_list backward(torch::autograd::AutogradContext *ctx,
                                                   torch::autograd::variable_list grads) {
        TORCH_CHECK(!at::GradMode::is_enabled(),
                    "mlpmixer: the residual node's backward is not differentiable (no gradients of gradients)");
        const auto &d = ctx->saved_data;
        // the bodies' operators straight to their CPU kernels: every tensor they make is the node's own (no
        // graph is recorded here, and no view or in-place change of them is seen outside), so the autograd
        // and view-tracking layers each call would pass through (about 1 µs apiece, ~20 calls a node) are skipped
        at::AutoDispatchBelowADInplaceOrView below_autograd;
        std::vector<Tensor> g = residual_backward(
            grads[0], ctx->get_saved_variables(), d.at("activation").toStringRef(), d.at("left").toBool(),
            d.at("hidden_scale").toDouble(), d.at("branch_threshold").toInt(), d.at("branch_scale").toDouble(),
            d.at("branch_key").toInt(), static_cast<at::ScalarType>(d.at("grad_dtype").toInt()));
        g.resize(16);  // no gradients for the options
        return g;
    }
};

Tensor residual_mlp(const Tensor &x, const Tensor &norm_w, const Tensor &norm_b, const Tensor &w1, const Tensor &b1,
                    const Tensor &w2, const Tensor &b2, double eps, const std::string &activation, bool left,
                    bool autocast_bf16, int64_t hidden_threshold, double hidden_scale, int64_t branch_threshold,
                    double branch_scale, bool keep) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return ResidualMlp::apply(x, norm_w, norm_b, w1, b1, w2, b2, eps, activation, left, autocast_bf16,
                              hidden_threshold, hidden_scale, branch_threshold, branch_scale, keep);
}

// without autograd (inference mode): the forward alone
Tensor residual_mlp_forward_only(const Tensor &x, const Tensor &norm_w, const Tensor &norm_b, const Tensor &w1,
                                 const Tensor &b1, const Tensor &w2, const Tensor &b2, double eps,
                                 const std::string &activation, bool left, bool autocast_bf16,
                                 int64_t hidden_threshold, double hidden_scale, int64_t branch_threshold,
                                 double branch_scale, bool keep) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    return std::get<0>(residual_forward(x, norm_w, norm_b, w1, b1, w2, b2, eps, activation, left, autocast_bf16,
                                        hidden_threshold, hidden_scale, branch_threshold, branch_scale, false));
}

void set_kernels(const std::vector<int64_t> &addresses, const Tensor &value, const Tensor &slope) {
    TORCH_CHECK(static_cast<int64_t>(addresses.size()) == KERNELS, "mlpmixer: expected ", KERNELS, " kernels");
    kernels.clear();
    for (int64_t a : addresses) kernels.push_back(reinterpret_cast<void *>(a));
    gelu_value = value.contiguous();
    gelu_slope = slope.contiguous();
}

}  // namespace

TORCH_LIBRARY(mlpmixer, m) {
    m.def("set_kernels(int[] addresses, Tensor gelu_value, Tensor gelu_slope) -> ()", &set_kernels);
    m.def("residual_mlp(Tensor x, Tensor norm_w, Tensor norm_b, Tensor w1, Tensor b1, Tensor w2, Tensor b2, "
          "float eps, str activation, bool left, bool autocast_bf16, int hidden_threshold, float hidden_scale, "
          "int branch_threshold, float branch_scale, bool keep) -> Tensor");
}

TORCH_LIBRARY_IMPL(mlpmixer, Autograd, m) { m.impl("residual_mlp", &residual_mlp); }
TORCH_LIBRARY_IMPL(mlpmixer, CPU, m) { m.impl("residual_mlp", &residual_mlp_forward_only); }
