// Native CPU cross-entropy of the fused loss, fp32: the row pass of the PyTorch backend
// (drift_engine/ops/torch_impl.py) fused into one loop per row, and the weighted scalar loss
// with its autograd node in C++.
//
// Built on the user's machine by `drift-engine native build` (drift_engine/ops/native.py gives
// the command line); without it every op runs the Python backend. Two ops:
//
//   drift_engine_native::ce_forward        the backend contract of torch_impl.ce_forward:
//                                          per-row loss and lse, and with row_coef the
//                                          gradients of Σ_i row_coef_i·loss_i
//   drift_engine_native::weighted_cross_entropy
//                                          Σ_i c_i·loss_i with c = w ("sum") or w / Σw
//                                          ("mean"), gradients in forward, backward a scale;
//                                          the labels and (check_weights) weights checked
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
// value (checked against double at 87 million points of [-87, 0]). Inputs below -87
// (exp(-87) = 1.6e-38, the normal range's edge) are flushed to 0, so a -inf (masked) logit
// gets an exact zero gradient as in ATen; NaN stays NaN.
inline float exp_nonpositive(float x) {
  const float clamped = x < -87.0f ? -87.0f : x;  // keeps 2^n a normal float
  const float n = std::floor(clamped * 1.44269504088896341f + 0.5f);
  float r = clamped - n * 0.693359375f;  // ln2 split in two for an exact n·ln2_hi
  r = r - n * -2.12194440e-4f;
  float p = 1.9875691500E-4f;
  p = p * r + 1.3981999507E-3f;
  p = p * r + 8.3334519073E-3f;
  p = p * r + 4.1665795894E-2f;
  p = p * r + 1.6666665459E-1f;
  p = p * r + 5.0000001201E-1f;
  p = p * (r * r) + r + 1.0f;
  const float result = p * std::bit_cast<float>((static_cast<int32_t>(n) + 127) << 23);  // p·2^n
  return x < -87.0f ? 0.0f : result;
}

struct RowOptions {
  int64_t vocab_size;
  int64_t ignore_index;
  float smoothing;
  float z_loss;
  bool with_grad;
};

// Rows of logits per block of the row pass: 64 KiB of fp32 (at most 256 rows), so a block
// stays in L2 between its passes; one row when rows are wider.
constexpr int64_t kBlockElements = int64_t{1} << 14;
constexpr int64_t kMaxBlockRows = 256;

// A block of `rows` rows of logits s (rows, V) in place: each row's loss and log-sum-exp,
// and with a gradient each row becomes coef·d loss / d s =
// coef·(p (1 + 2 z lse) - (1 - ε) δ_y - ε / V), p = softmax(s). Per row: max (and Σ s for
// smoothing), then s - max; exp over the whole block as one flat loop (per-row loops leave a
// vector remainder in every row: at V=120 that made the pass 1.4x slower); per row Σ exp,
// the loss, the gradient.
inline void block_pass(float* s, int64_t rows, int64_t first_row, const int64_t* labels,
                       const float* coefs, const RowOptions& o, float* loss_out,
                       float* lse_out) {
  const int64_t V = o.vocab_size;
  float row_max[kMaxBlockRows], target_logit[kMaxBlockRows], mean_logit[kMaxBlockRows];
  for (int64_t i = 0; i < rows; ++i) {
    const int64_t label = labels[i];
    TORCH_CHECK_VALUE(label == o.ignore_index || (label >= 0 && label < V), "labels[",
                      first_row + i,
                      "] = ", label, " is outside [0, ", V, ") and is not ignore_index (",
                      o.ignore_index, ")");
    float* row = s + i * V;
    float max = -std::numeric_limits<float>::infinity();
    float sum_logits = 0.0f;
#pragma omp simd reduction(max : max) reduction(+ : sum_logits)
    for (int64_t j = 0; j < V; ++j) {
      max = row[j] > max ? row[j] : max;
      sum_logits += row[j];
    }
    row_max[i] = max;
    target_logit[i] = label == o.ignore_index ? 0.0f : row[label];
    mean_logit[i] = sum_logits / static_cast<float>(V);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) row[j] -= max;
  }
  const int64_t elements = rows * V;
#pragma omp simd
  for (int64_t k = 0; k < elements; ++k) s[k] = exp_nonpositive(s[k]);
  for (int64_t i = 0; i < rows; ++i) {
    float* row = s + i * V;
    float sum_exp = 0.0f;
#pragma omp simd reduction(+ : sum_exp)
    for (int64_t j = 0; j < V; ++j) sum_exp += row[j];
    const float lse = row_max[i] + std::log(sum_exp);
    const bool ignored = labels[i] == o.ignore_index;
    float loss = (1.0f - o.smoothing) * (lse - target_logit[i]);
    if (o.smoothing > 0.0f) loss += o.smoothing * (lse - mean_logit[i]);
    if (o.z_loss > 0.0f) loss += o.z_loss * lse * lse;
    loss_out[i] = ignored ? 0.0f : loss;
    lse_out[i] = lse;
    if (!o.with_grad) continue;
    const float coef = coefs[i];
    if (ignored || coef == 0.0f) {  // no contribution, even from a non-finite row
      std::fill(row, row + V, 0.0f);
      continue;
    }
    // row_j · scale = c·p_j (1 + 2z·lse), the row holding exp(s_j - max)
    const float scale = coef * (1.0f + 2.0f * o.z_loss * lse) / sum_exp;
    const float shift = -coef * o.smoothing / static_cast<float>(V);
#pragma omp simd
    for (int64_t j = 0; j < V; ++j) row[j] = row[j] * scale + shift;
    row[labels[i]] -= coef * (1.0f - o.smoothing);
  }
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
  TORCH_CHECK_VALUE(hidden.device().is_cpu() && weight.device().is_cpu() && labels.device().is_cpu(),
                    "the native cross-entropy runs on CPU tensors");
  TORCH_CHECK_VALUE(hidden.dim() == 2 && weight.dim() == 2 && hidden.size(1) == weight.size(1),
                    "hidden must be (N, H) and weight (V, H)");
  const int64_t N = hidden.size(0), V = weight.size(0);
  TORCH_CHECK_VALUE(V > 0, "weight must have at least one row (V > 0)");
  TORCH_CHECK_VALUE(labels.dim() == 1 && labels.size(0) == N, "labels must be (N,)");
  TORCH_CHECK_VALUE(!bias.has_value() || (bias->scalar_type() == at::kFloat &&
                                          bias->is_contiguous() && bias->dim() == 1 &&
                                          bias->size(0) == V && bias->device().is_cpu()),
                    "bias must be a contiguous (V,) fp32 CPU tensor");
  const auto f32 = hidden.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, f32), lse = at::empty({N}, f32);
  const bool with_grad =
      row_coef.defined() && (grad_hidden_wanted || grad_weight_wanted || grad_bias_wanted);
  Grads grads;
  if (with_grad) {
    TORCH_CHECK_VALUE(row_coef.scalar_type() == at::kFloat && row_coef.is_contiguous() &&
                          row_coef.numel() == N && row_coef.device().is_cpu(),
                      "row_coef must be a contiguous (N,) fp32 CPU tensor");
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
  const RowOptions row_options{V, ignore_index, static_cast<float>(smoothing),
                               static_cast<float>(z_loss), with_grad};
  const at::Tensor weight_t = weight.t();  // (H, V)
  const int64_t block_rows = std::clamp<int64_t>(kBlockElements / V, 1, kMaxBlockRows);
  for (int64_t start = 0; start < N; start += chunk) {
    const int64_t rows = std::min(chunk, N - start);
    const at::Tensor hidden_chunk = hidden.narrow(0, start, rows);  // (c, H)
    at::Tensor logits = buffer.narrow(0, 0, rows);                  // (c, V)
    if (bias.has_value())
      at::addmm_out(logits, *bias, hidden_chunk, weight_t);
    else
      at::mm_out(logits, hidden_chunk, weight_t);
    float* logits_ptr = logits.data_ptr<float>();
    const int64_t blocks = (rows + block_rows - 1) / block_rows;
    // two blocks (32k logits) per task at least, so a small head stays on one thread
    at::parallel_for(0, blocks, 2, [&](int64_t begin, int64_t end) {
      for (int64_t block = begin; block < end; ++block) {
        const int64_t first = block * block_rows, count = std::min(block_rows, rows - first);
        const int64_t row = start + first;
        block_pass(logits_ptr + first * V, count, row, label_ptr + row,
                   with_grad ? coef_ptr + row : nullptr, row_options, loss_ptr + row,
                   lse_ptr + row);
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
// all-ignored batch has loss 0 and zero gradients). With check_weights, every weight must be
// finite and >= 0 (the check of check_labels=True; the labels are checked by the row pass).
at::Tensor row_coefficients(const at::Tensor& labels,
                            const c10::optional<at::Tensor>& token_weights, bool mean,
                            int64_t ignore_index, bool check_weights) {
  TORCH_CHECK_VALUE(labels.scalar_type() == at::kLong && labels.dim() == 1 &&
                        labels.is_contiguous() && labels.device().is_cpu(),
                    "labels must be a contiguous (N,) int64 CPU tensor");
  const int64_t N = labels.size(0);
  at::Tensor coef = at::empty({N}, labels.options().dtype(at::kFloat));
  float* coef_ptr = coef.data_ptr<float>();
  const int64_t* label_ptr = labels.data_ptr<int64_t>();
  at::Tensor weights;
  if (token_weights.has_value()) {
    TORCH_CHECK_VALUE(token_weights->numel() == N && token_weights->device().is_cpu(),
                      "token_weights must be an (N,) CPU tensor");
    weights = token_weights->to(at::kFloat).contiguous();
  }
  const float* weight_ptr = weights.defined() ? weights.data_ptr<float>() : nullptr;
  if (check_weights && weight_ptr)
    for (int64_t i = 0; i < N; ++i)
      TORCH_CHECK_VALUE(std::isfinite(weight_ptr[i]) && weight_ptr[i] >= 0.0f, "token_weights[",
                        i, "] = ", weight_ptr[i], " is negative or not finite");
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
                            double z_loss, bool check_weights) {
    const at::Tensor coef =
        row_coefficients(labels, token_weights, mean, ignore_index, check_weights);
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
    grads.resize(11);  // no gradient for labels, weights and the options
    return grads;
  }
};

// The loss alone (evaluation, no_grad, inference mode): one pass without the gradient GEMMs.
at::Tensor weighted_cross_entropy_value(const at::Tensor& hidden, const at::Tensor& weight,
                                        const c10::optional<at::Tensor>& bias,
                                        const at::Tensor& labels,
                                        const c10::optional<at::Tensor>& token_weights,
                                        bool mean, int64_t ignore_index, int64_t chunk,
                                        double smoothing, double z_loss, bool check_weights) {
  const at::Tensor coef =
      row_coefficients(labels, token_weights, mean, ignore_index, check_weights);
  auto [loss, lse, grads] = forward_pass(hidden, weight, bias, labels, at::Tensor(),
                                         ignore_index, chunk, smoothing, z_loss, false, false,
                                         false);
  return at::dot(coef, loss);
}

at::Tensor weighted_cross_entropy(const at::Tensor& hidden, const at::Tensor& weight,
                                  const c10::optional<at::Tensor>& bias, const at::Tensor& labels,
                                  const c10::optional<at::Tensor>& token_weights, bool mean,
                                  int64_t ignore_index, int64_t chunk, double smoothing,
                                  double z_loss, bool check_weights) {
  const bool wants_grad = at::GradMode::is_enabled() &&
                          (hidden.requires_grad() || weight.requires_grad() ||
                           (bias.has_value() && bias->requires_grad()));
  if (!wants_grad) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    return weighted_cross_entropy_value(hidden, weight, bias, labels, token_weights, mean,
                                        ignore_index, chunk, smoothing, z_loss, check_weights);
  }
  return WeightedCrossEntropy::apply(hidden, weight, bias, labels, token_weights, mean,
                                     ignore_index, chunk, smoothing, z_loss, check_weights);
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
      "float z_loss, bool check_weights) -> Tensor");
  m.impl("weighted_cross_entropy", c10::DispatchKey::Autograd,
         TORCH_FN(weighted_cross_entropy));
  // below autograd (inference mode): the loss alone
  m.impl("weighted_cross_entropy", c10::DispatchKey::CPU,
         TORCH_FN(weighted_cross_entropy_value));
}
