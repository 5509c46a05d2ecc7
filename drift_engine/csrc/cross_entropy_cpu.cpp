// Native CPU cross-entropy of the fused loss, fp32: the row pass of the PyTorch backend
// (drift_engine/ops/torch_impl.py) fused into one loop per row, and the weighted scalar loss
// with its autograd node in C++.
//
// Built on the user's machine by `python -m drift_engine.ops.native build` (drift_engine/ops/
// native.py gives the command line); without it every op runs the Python backend. Two ops:
//
//   drift_engine_native::ce_forward        the backend contract of torch_impl.ce_forward:
//                                          per-row loss and lse, and with row_coef the
//                                          gradients of Σ_i row_coef_i·loss_i
//   drift_engine_native::weighted_cross_entropy
//                                          Σ_i c_i·loss_i with c = w ("sum") or w / Σw
//                                          ("mean"), gradients in forward, backward a scale
//
// The second is what a training step calls in eager mode: at a small head (the demo's
// N=512, H=64, V=120) the Python layers around the three GEMMs cost more than the GEMMs, and
// PyTorch's dense loss issues its few ops from C++; here the whole loss is one call.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>

namespace {

// exp(x) for x <= 0 (a logit minus its row's max), as a branch-free polynomial the compiler
// vectorises (std::exp is a scalar library call): Cody-Waite reduction x = n·ln2 + r,
// |r| <= ln2/2, and Cephes' degree-6 polynomial for exp(r): under 1 ulp from the exact
// value (checked against double at 87 million points of [-87, 0]). Inputs
// below -87 are clamped there (exp(-87) = 1.6e-38, the normal range's edge), which changes a
// row's sum by at most V·1.6e-38 relative.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float n = std::floor(x * 1.44269504088896341f + 0.5f);
  float r = x - n * 0.693359375f;  // ln2 split in two for an exact n·ln2_hi
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  return p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);  // p·2^n
}

struct RowOptions {
  float smoothing;
  float z_loss;
  bool with_grad;
};

// One row of logits s (V,) in place: its loss and log-sum-exp, and with a gradient the row
// becomes coef·d loss / d s = coef·(p (1 + 2 z lse) - (1 - ε) δ_y - ε / V), p = softmax(s).
// Three passes over a row that stays in cache: max (and Σ s for smoothing), exp and Σ exp,
// the gradient (two without one).
inline void row_pass(float* s, int64_t V, int64_t label, bool ignored, float coef,
                     const RowOptions& o, float* loss_out, float* lse_out) {
  float max = -std::numeric_limits<float>::infinity();
  float sum_logits = 0.0f;
#pragma omp simd reduction(max : max) reduction(+ : sum_logits)
  for (int64_t j = 0; j < V; ++j) {
    max = s[j] > max ? s[j] : max;
    sum_logits += s[j];
  }
  const float target_logit = s[label];
  float sum_exp = 0.0f;
  if (o.with_grad) {  // exp(s - max) kept in the row for the gradient
#pragma omp simd reduction(+ : sum_exp)
    for (int64_t j = 0; j < V; ++j) {
      const float e = exp_nonpositive(s[j] - max);
      s[j] = e;
      sum_exp += e;
    }
  } else {
#pragma omp simd reduction(+ : sum_exp)
    for (int64_t j = 0; j < V; ++j) sum_exp += exp_nonpositive(s[j] - max);
  }
  const float lse = max + std::log(sum_exp);
  float loss = (1.0f - o.smoothing) * (lse - target_logit);
  if (o.smoothing > 0.0f) loss += o.smoothing * (lse - sum_logits / static_cast<float>(V));
  if (o.z_loss > 0.0f) loss += o.z_loss * lse * lse;
  *loss_out = ignored ? 0.0f : loss;
  *lse_out = lse;
  if (!o.with_grad) return;
  if (ignored || coef == 0.0f) {
    std::fill(s, s + V, 0.0f);
    return;
  }
  const float scale = coef * (1.0f + 2.0f * o.z_loss * lse) / sum_exp;  // e_j · scale = c·p_j(1+2z·lse)
  const float shift = -coef * o.smoothing / static_cast<float>(V);
#pragma omp simd
  for (int64_t j = 0; j < V; ++j) s[j] = s[j] * scale + shift;
  s[label] -= coef * (1.0f - o.smoothing);
}

struct Grads {
  at::Tensor hidden, weight, bias;  // undefined where not asked for
};

// The chunk loop: logits of `chunk` rows at a time into one (chunk, V) buffer, the row
// pass, then the chunk's share of the gradients (row_coef defined) for those asked for.
std::tuple<at::Tensor, at::Tensor, Grads> forward_pass(
    const at::Tensor& hidden,           // (N, H) fp32 contiguous
    const at::Tensor& weight,           // (V, H) fp32 contiguous
    const c10::optional<at::Tensor>& bias,  // (V,) fp32
    const at::Tensor& labels,           // (N,) int64
    const at::Tensor& row_coef,         // (N,) fp32, or undefined: no gradients
    int64_t ignore_index, int64_t chunk, double smoothing, double z_loss,
    bool grad_hidden_wanted, bool grad_weight_wanted, bool grad_bias_wanted) {
  TORCH_CHECK_VALUE(hidden.scalar_type() == at::kFloat && weight.scalar_type() == at::kFloat,
                    "the native cross-entropy takes fp32 hidden and weight");
  TORCH_CHECK_VALUE(hidden.is_contiguous() && weight.is_contiguous() && labels.is_contiguous(),
                    "the native cross-entropy takes contiguous inputs");
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong, "labels must be int64");
  const int64_t N = hidden.size(0), V = weight.size(0);
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, f32), lse = at::empty({N}, f32);
  const bool with_grad =
      row_coef.defined() && (grad_hidden_wanted || grad_weight_wanted || grad_bias_wanted);
  Grads grads;
  if (with_grad) {
    TORCH_CHECK_VALUE(row_coef.scalar_type() == at::kFloat && row_coef.is_contiguous() &&
                          row_coef.numel() == N,
                      "row_coef must be a contiguous (N,) fp32 tensor");
    if (grad_hidden_wanted) grads.hidden = at::empty_like(hidden);
    // written by the first chunk's GEMM; zeros when there is no chunk
    if (grad_weight_wanted) grads.weight = N > 0 ? at::empty_like(weight) : at::zeros_like(weight);
    if (grad_bias_wanted && bias.has_value()) grads.bias = at::zeros_like(*bias);
  }
  if (N == 0) return {loss, lse, grads};
  chunk = std::clamp<int64_t>(chunk, 1, N);
  at::Tensor buffer = at::empty({chunk, V}, f32);  // (chunk, V), reused by every chunk
  const int64_t* label_ptr = labels.data_ptr<int64_t>();
  const float* coef_ptr = with_grad ? row_coef.data_ptr<float>() : nullptr;
  float* loss_ptr = loss.data_ptr<float>();
  float* lse_ptr = lse.data_ptr<float>();
  const RowOptions row_options{static_cast<float>(smoothing), static_cast<float>(z_loss),
                               with_grad};
  const at::Tensor weight_t = weight.t();  // (H, V)
  // rows per parallel task: about 32k logits, so a small head stays on one thread
  const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 15) / std::max<int64_t>(V, 1));
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows = std::min(chunk, N - start);
    const at::Tensor hidden_chunk = hidden.narrow(0, start, rows);  // (c, H)
    at::Tensor logits = buffer.narrow(0, 0, rows);                  // (c, V)
    if (bias.has_value())
      at::addmm_out(logits, *bias, hidden_chunk, weight_t);
    else
      at::mm_out(logits, hidden_chunk, weight_t);
    float* logits_ptr = logits.data_ptr<float>();
    at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const int64_t row = start + i, label = label_ptr[row];
        const bool ignored = label == ignore_index;
        TORCH_CHECK_VALUE(ignored || (label >= 0 && label < V), "labels[", row, "] = ", label,
                          " is outside [0, ", V, ") and is not ignore_index (", ignore_index,
                          ")");
        row_pass(logits_ptr + i * V, V, ignored ? 0 : label, ignored,
                 with_grad ? coef_ptr[row] : 0.0f, row_options, loss_ptr + row, lse_ptr + row);
      }
    });
    if (!with_grad) continue;
    // logits now holds diag(row_coef)·d loss / d logits
    if (grads.hidden.defined()) {
      at::Tensor grad_hidden_chunk = grads.hidden.narrow(0, start, rows);
      at::mm_out(grad_hidden_chunk, logits, weight);  // (c, V) @ (V, H)
    }
    if (grads.weight.defined()) {
      if (start == 0)
        at::mm_out(grads.weight, logits.t(), hidden_chunk);  // (V, c) @ (c, H)
      else
        grads.weight.addmm_(logits.t(), hidden_chunk);
    }
    if (grads.bias.defined()) grads.bias.add_(logits.sum(0));
  }
  return {loss, lse, grads};
}

at::Tensor absent(const at::Tensor& like) { return at::empty({0}, like.options()); }

// The backend contract (torch_impl.ce_forward): (loss, lse, grad_hidden, grad_weight,
// grad_bias), each gradient (0,) without row_coef (grad_bias also without a bias).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> ce_forward(
    const at::Tensor& hidden, const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
    const at::Tensor& labels, const c10::optional<at::Tensor>& row_coef, int64_t ignore_index,
    int64_t chunk, double smoothing, double z_loss) {
  auto [loss, lse, grads] =
      forward_pass(hidden, weight, bias, labels, row_coef.value_or(at::Tensor()), ignore_index,
                   chunk, smoothing, z_loss, true, true, true);
  auto present = [&](const at::Tensor& t) { return t.defined() ? t : absent(loss); };
  return {loss, lse, present(grads.hidden), present(grads.weight), present(grads.bias)};
}

// (N,) fp32 coefficient of each row's loss in the scalar loss, as autograd.row_coefficients:
// w (1 without weights), 0 on ignored rows, divided by Σw for "mean" when Σw > 0 (an
// all-ignored batch has loss 0 and zero gradients).
at::Tensor row_coefficients(const at::Tensor& labels,
                            const c10::optional<at::Tensor>& token_weights, bool mean,
                            int64_t ignore_index) {
  const int64_t N = labels.size(0);
  at::Tensor coef = at::empty({N}, labels.options().dtype(at::kFloat));
  float* coef_ptr = coef.data_ptr<float>();
  const int64_t* label_ptr = labels.data_ptr<int64_t>();
  at::Tensor weights;
  if (token_weights.has_value()) weights = token_weights->to(at::kFloat).contiguous();
  const float* weight_ptr = weights.defined() ? weights.data_ptr<float>() : nullptr;
  double total = 0.0;  // Σw summed in double, then rounded once
  for (int64_t i = 0; i < N; ++i) {
    coef_ptr[i] = label_ptr[i] == ignore_index ? 0.0f : (weight_ptr ? weight_ptr[i] : 1.0f);
    total += coef_ptr[i];
  }
  if (mean && total > 0.0) {
    const float divisor = static_cast<float>(total);
    for (int64_t i = 0; i < N; ++i) coef_ptr[i] /= divisor;
  }
  return coef;
}

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Scalar Σ_i c_i·loss_i. The gradients come out of forward; backward scales them in place by
// the upstream scalar (one copy of each), so backward runs once per forward, as the Python
// Function's (autograd.WeightedLinearCrossEntropy) does.
class WeightedCrossEntropy : public torch::autograd::Function<WeightedCrossEntropy> {
 public:
  static at::Tensor forward(AutogradContext* ctx, const at::Tensor& hidden,
                            const at::Tensor& weight, const c10::optional<at::Tensor>& bias,
                            const at::Tensor& labels,
                            const c10::optional<at::Tensor>& token_weights, bool mean,
                            int64_t ignore_index, int64_t chunk, double smoothing,
                            double z_loss) {
    const at::Tensor coef = row_coefficients(labels, token_weights, mean, ignore_index);
    const bool bias_grad = bias.has_value() && bias->requires_grad();
    auto [loss, lse, grads] =
        forward_pass(hidden, weight, bias, labels, coef, ignore_index, chunk, smoothing, z_loss,
                     hidden.requires_grad(), weight.requires_grad(), bias_grad);
    ctx->save_for_backward({grads.hidden, grads.weight, grads.bias});
    ctx->saved_data["consumed"] = false;
    return at::dot(coef, loss);  // () fp32
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    TORCH_CHECK_VALUE(!ctx->saved_data["consumed"].toBool(),
                      "backward ran twice through one fused_linear_cross_entropy(reduction="
                      "'mean' or 'sum') call; its gradients are computed in forward and handed "
                      "out once. Recompute the loss for each backward pass");
    ctx->saved_data["consumed"] = true;
    const at::Tensor& grad_output = grad_outputs[0];  // ()
    variable_list grads = ctx->get_saved_variables();
    for (at::Tensor& grad : grads)
      if (grad.defined()) grad.mul_(grad_output);  // in place: these buffers are this call's
    grads.resize(10);  // no gradient for labels, weights and the options
    return grads;
  }
};

// The loss alone (evaluation, no_grad, inference mode): one pass without the gradient GEMMs.
at::Tensor weighted_cross_entropy_value(const at::Tensor& hidden, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const at::Tensor& labels,
                                        const c10::optional<at::Tensor>& token_weights,
                                        bool mean, int64_t ignore_index, int64_t chunk,
                                        double smoothing, double z_loss) {
  const at::Tensor coef = row_coefficients(labels, token_weights, mean, ignore_index);
  auto [loss, lse, grads] = forward_pass(hidden, weight, bias, labels, at::Tensor(),
                                         ignore_index, chunk, smoothing, z_loss, false, false,
                                         false);
  return at::dot(coef, loss);
}

at::Tensor weighted_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                                  const c10::optional<at::Tensor>& token_weights, bool mean,
                                  int64_t ignore_index, int64_t chunk, double smoothing,
                                  double z_loss) {
  const bool wants_grad = at::GradMode::is_enabled() &&
                          (hidden.requires_grad() || weight.requires_grad() ||
                           (bias.has_value() && bias->requires_grad()));
  if (!wants_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return weighted_cross_entropy_value(hidden, weight, bias, labels, token_weights, mean,
                                        ignore_index, chunk, smoothing, z_loss);
  }
  return WeightedCrossEntropy::apply(hidden, weight, bias, labels, token_weights, mean,
                                     ignore_index, chunk, smoothing, z_loss);
}

}  // namespace

TORCH_LIBRARY(drift_engine_native, m) {
  m.def(
      "ce_forward(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, Tensor? row_coef, "
      "int ignore_index, int chunk, float label_smoothing, float z_loss) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.impl("ce_forward", c10::DispatchKey::CPU, TORCH_FN(ce_forward));
  m.def(
      "weighted_cross_entropy(Tensor hidden, Tensor weight, Tensor? bias, Tensor labels, "
      "Tensor? token_weights, bool mean, int ignore_index, int chunk, float label_smoothing, "
      "float z_loss) -> Tensor");
  m.impl("weighted_cross_entropy", c10::DispatchKey::Autograd,
         TORCH_FN(weighted_cross_entropy));
  // below autograd (inference mode): the loss alone
  m.impl("weighted_cross_entropy", c10::DispatchKey::CPU,
         TORCH_FN(weighted_cross_entropy_value));
}
