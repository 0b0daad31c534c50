// One AdamW step with the training loop's gradient scaling and clipping, as one torch operator
// (mlpmixer.optim.AdamW; issue 17). From Python the same work is a foreach norm, a foreach multiply and
// torch.optim.AdamW.step, which on the CPU walk the gradients tensor by tensor with Python and a
// dispatch for each; here the walk is a C++ loop and the update is torch's own fused AdamW kernel.
// Built into the same library as node.cpp (mlpmixer/node.py).
#include <ATen/core/Tensor.h>
#include <ATen/ops/_fused_adamw.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

namespace {

using at::Tensor;

bool plain(const Tensor &t) {
    return t.defined() && t.layout() == at::kStrided && t.device().is_cpu() && t.scalar_type() == at::kFloat &&
           t.is_contiguous();
}

// 16 floats: one AVX-512 register, two AVX2 ones or four SSE ones; on x86-64 the two loops below are
// built for each (target_clones: the loader picks the processor's), as this file is built without
// -march; elsewhere for the baseline
typedef float vf __attribute__((vector_size(64)));
constexpr int64_t V = 16, BLOCK = 256;  // a block's squares are summed in float32, 16 per lane
#if defined(__x86_64__) && defined(__ELF__)
#define FOR_EACH_PROCESSOR __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define FOR_EACH_PROCESSOR
#endif

inline vf load(const float *p) { vf v; std::memcpy(&v, p, sizeof v); return v; }

// Σ x² of n values: blocks of 256 summed in float32 lanes, the blocks in float64
FOR_EACH_PROCESSOR double squares(const float *x, int64_t n) {
    double sum = 0.0;
    int64_t k = 0;
    for (; k + BLOCK <= n; k += BLOCK) {
        vf acc = {0};
        for (int64_t j = k; j < k + BLOCK; j += V) acc += load(x + j) * load(x + j);
        float block = 0.0f;
        for (int64_t l = 0; l < V; ++l) block += acc[l];
        sum += block;
    }
    for (; k < n; ++k) sum += static_cast<double>(x[k]) * x[k];
    return sum;
}

// x *= s: float32 products rounded once, as torch's `mul_` by a Python float
FOR_EACH_PROCESSOR void scale(float *x, int64_t n, float s) {
    int64_t k = 0;
    for (; k + V <= n; k += V) {
        const vf y = load(x + k) * s;
        std::memcpy(x + k, &y, sizeof y);
    }
    for (; k < n; ++k) x[k] *= s;
}

// Σ x² over every value of `tensors`, each tensor's sum apart and then the tensors in order, so the
// result does not depend on the thread count
double sum_of_squares(const std::vector<Tensor> &tensors) {
    std::vector<double> part(tensors.size(), 0.0);
    at::parallel_for(0, static_cast<int64_t>(tensors.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) part[i] = squares(tensors[i].data_ptr<float>(), tensors[i].numel());
    });
    double sum = 0.0;
    for (double p : part) sum += p;
    return sum;
}

void scale_(const std::vector<Tensor> &tensors, float s) {
    at::parallel_for(0, static_cast<int64_t>(tensors.size()), 1, [&](int64_t begin, int64_t end) {
        for (int64_t i = begin; i < end; ++i) scale(tensors[i].data_ptr<float>(), tensors[i].numel(), s);
    });
}

// One step of AdamW (torch.optim.AdamW with fused=True) over parameter groups: `params`, `exp_avgs`,
// `exp_avg_sqs` and `steps` list every group's parameters and their state in order (an undefined
// tensor where a parameter has no state yet), `group_ends` where each group stops. First the gradients
// are multiplied by `grad_multiplier` and clipped to the global norm `max_norm` (0: none) as
// torch.nn.utils.clip_grad_norm_ does (coefficient max_norm / (norm + 1e-6), at most 1). As torch's
// step, parameters without a gradient are skipped. Returns the gradients' norm after the multiplier
// (before clipping; -1 when not computed), or NaN, having changed nothing, where a parameter with a
// gradient has no state yet or a tensor is not a contiguous float32 CPU one: the caller then takes
// torch's own step.
double adamw_step(const std::vector<Tensor> &params, const std::vector<std::optional<Tensor>> &exp_avgs,
                  const std::vector<std::optional<Tensor>> &exp_avg_sqs,
                  const std::vector<std::optional<Tensor>> &steps, const std::vector<int64_t> &group_ends,
                  const std::vector<double> &lrs, const std::vector<double> &beta1s,
                  const std::vector<double> &beta2s, const std::vector<double> &weight_decays,
                  const std::vector<double> &epss, double grad_multiplier, double max_norm) {
    const size_t n = params.size(), groups = group_ends.size();
    TORCH_CHECK(exp_avgs.size() == n && exp_avg_sqs.size() == n && steps.size() == n,
                "mlpmixer: adamw_step takes one state entry per parameter");
    TORCH_CHECK(lrs.size() == groups && beta1s.size() == groups && beta2s.size() == groups &&
                weight_decays.size() == groups && epss.size() == groups,
                "mlpmixer: adamw_step takes one option of each kind per group");
    std::vector<Tensor> p, g, m, v, t;  // the parameters with a gradient, and theirs
    std::vector<size_t> ends;
    size_t start = 0;
    for (size_t k = 0; k < groups; ++k) {
        const size_t end = static_cast<size_t>(group_ends[k]);
        TORCH_CHECK(end >= start && end <= n, "mlpmixer: adamw_step's group_ends must rise to the parameter count");
        for (size_t i = start; i < end; ++i) {
            const Tensor &grad = params[i].grad();
            if (!grad.defined()) continue;
            if (!exp_avgs[i] || !exp_avg_sqs[i] || !steps[i]) return std::nan("");
            const Tensor &step = *steps[i];
            if (!plain(params[i]) || !plain(grad) || !plain(*exp_avgs[i]) || !plain(*exp_avg_sqs[i]) ||
                !plain(step) || step.numel() != 1 || grad.sizes() != params[i].sizes())
                return std::nan("");
            p.push_back(params[i]), g.push_back(grad), m.push_back(*exp_avgs[i]), v.push_back(*exp_avg_sqs[i]);
            t.push_back(step);
        }
        ends.push_back(p.size());
        start = end;
    }
    double norm = -1.0, scale = grad_multiplier;
    if (max_norm > 0.0 && !g.empty()) {
        norm = std::sqrt(sum_of_squares(g)) * grad_multiplier;
        scale *= std::min(1.0, max_norm / (norm + 1e-6));
    }
    if (scale != 1.0) scale_(g, static_cast<float>(scale));
    for (const Tensor &step : t) *step.data_ptr<float>() += 1.0f;  // torch's _foreach_add_(steps, 1)
    size_t begin = 0;
    for (size_t k = 0; k < groups; ++k) {
        if (ends[k] > begin) {
            const auto slice = [&](const std::vector<Tensor> &all) {
                return std::vector<Tensor>(all.begin() + begin, all.begin() + ends[k]);
            };
            at::_fused_adamw_(slice(p), slice(g), slice(m), slice(v), {}, slice(t), lrs[k], beta1s[k], beta2s[k],
                              weight_decays[k], epss[k], false, false, std::nullopt, std::nullopt);
        }
        begin = ends[k];
    }
    return norm;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mlpmixer, m) {
    m.def("adamw_step(Tensor[] params, Tensor?[] exp_avgs, Tensor?[] exp_avg_sqs, Tensor?[] steps, "
          "int[] group_ends, float[] lrs, float[] beta1s, float[] beta2s, float[] weight_decays, float[] epss, "
          "float grad_multiplier, float max_norm) -> float",
          &adamw_step);
}
