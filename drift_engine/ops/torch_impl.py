"""Chunked pure-PyTorch backend of the fused ops (``impl="torch"``).

Implements the backend contract of docs/architecture.md (the same functions as
``drift_engine.kernels``): the CPU path, the fallback, and the oracle of the Triton kernels.

Rows are processed in chunks of ``chunk`` tokens, so at most a few ``(chunk, V)`` fp32
buffers of logits exist at any time, never ``(N, V)``. Logits are produced by a GEMM in the
inputs' dtype (as PyTorch's own dense path does) and everything after it (softcap,
log-sum-exp, softmax, gradients of the logits) is fp32. The gradient of the weight is
accumulated across chunks in fp32 and cast to the weight's dtype once at the end.
Plain tensors in, plain tensors out: no autograd (callers run under ``torch.no_grad``).
"""

from __future__ import annotations

import torch

from drift_engine.ops import native
from drift_engine.ops.options import CrossEntropyOptions, LogProbOptions

# Elements of one (chunk, V) fp32 buffer when chunk_size is not given: 64 Mi elements
# (256 MiB), on CPU as on accelerators. Every extra chunk re-reads the weight twice and
# reads and writes the (V, H) fp32 gradient accumulator once, a GEMM whose inner dimension
# is the chunk's rows: at the SmolLM2-135M head (H=576, V=49152) on 2 CPU threads, 85-row
# chunks (the former 4 Mi-element CPU budget) took the three GEMMs to 1.5x the unchunked
# GEMMs, 1024-row chunks to within a few percent (bench/results/cpu-2026-12-02).
CPU_CHUNK_ELEMENTS = 1 << 26
ACCELERATOR_CHUNK_ELEMENTS = 1 << 26

# Widest rows whose loss row pass is log_softmax + exp_ rather than max + softmax: on 2 CPU
# threads the first is 1.5x faster at V=120, as fast at V=16384, 1.25x slower at V=49152.
LOG_SOFTMAX_MAX_COLUMNS = 8192


def chunk_rows(
    num_tokens: int, vocab_size: int, chunk_size: int | None, device: torch.device
) -> int:
    """Rows of logits materialised at once: ``chunk_size``, or the fewest chunks the budget
    allows, balanced (2048 rows in chunks of 1365 at most become two of 1024, not 1365 and
    a thin 683)."""
    if chunk_size is not None or num_tokens == 0:
        return max(1, min(chunk_size or 1, num_tokens))
    budget = CPU_CHUNK_ELEMENTS if device.type == "cpu" else ACCELERATOR_CHUNK_ELEMENTS
    rows = max(1, min(num_tokens, budget // vocab_size))
    num_chunks = -(-num_tokens // rows)
    return -(-num_tokens // num_chunks)


def _logits_fp32(
    hidden_chunk: torch.Tensor,  # (c, H)
    weight: torch.Tensor,  # (V, H)
    bias: torch.Tensor | None,  # (V,)
    buffer: torch.Tensor | None = None,  # (>= c, V) fp32, reused across chunks
) -> torch.Tensor:
    """(c, V) fp32 logits hidden_chunk @ weight.T + bias; for fp32 inputs written into
    ``buffer`` when given (one allocation for all chunks, not one per chunk)."""
    if buffer is not None and hidden_chunk.dtype == torch.float32:
        logits = buffer[: hidden_chunk.shape[0]]
        torch.mm(hidden_chunk, weight.T, out=logits)
    else:
        logits = (hidden_chunk @ weight.T).float()  # inputs' dtype, then fp32
    if bias is not None:
        logits += bias.float()
    return logits


def _logits_buffer(hidden: torch.Tensor, weight: torch.Tensor, chunk: int) -> torch.Tensor | None:
    """The (chunk, V) fp32 buffer _logits_fp32 reuses; None for 16-bit inputs, whose GEMM
    output is a fresh input-dtype tensor anyway."""
    if hidden.dtype != torch.float32:
        return None
    return torch.empty(chunk, weight.shape[0], dtype=torch.float32, device=hidden.device)


def _accumulate_grads(
    grad_logits: torch.Tensor,  # (c, V) fp32
    hidden_chunk: torch.Tensor,  # (c, H)
    weight: torch.Tensor,  # (V, H)
    grad_hidden_chunk: torch.Tensor,  # (c, H), inputs' dtype; written
    grad_weight_acc: torch.Tensor,  # (V, H) fp32; written by the first chunk, then accumulated
    grad_bias_acc: torch.Tensor | None,  # (V,) fp32; accumulated
    first: bool,
    row_scale: torch.Tensor | None = None,  # (c,) fp32
) -> None:
    """Back-propagate a chunk's gradient of the logits, diag(row_scale)·grad_logits, through
    the linear layer.

    For fp32 the row scale is applied where it is cheap: on (c, H) tensors,
    grad_h = diag(r)·(G @ W) and grad_W += Gᵀ @ (diag(r)·h), unless the (c, V) buffer is
    the smaller (V <= 2H).
    """
    if hidden_chunk.dtype == torch.float32:
        if row_scale is not None and grad_logits.shape[1] <= 2 * hidden_chunk.shape[1]:
            # Narrow rows (V <= 2H): one in-place pass over the (c, V) buffer costs less
            # than scaling grad_h and a (c, H) copy of h.
            grad_logits.mul_(row_scale.unsqueeze(1))
            row_scale = None
        torch.mm(grad_logits, weight, out=grad_hidden_chunk)
        if row_scale is not None:
            grad_hidden_chunk *= row_scale.unsqueeze(1)
            hidden_chunk = hidden_chunk * row_scale.unsqueeze(1)  # (c, H)
        if first:
            torch.mm(grad_logits.T, hidden_chunk, out=grad_weight_acc)
        else:
            grad_weight_acc.addmm_(grad_logits.T, hidden_chunk)
        if grad_bias_acc is not None:
            if row_scale is None:
                grad_bias_acc += grad_logits.sum(dim=0)
            else:
                grad_bias_acc.addmv_(grad_logits.T, row_scale)
        return
    # fp16/bf16 GEMMs accumulate in fp32 internally; each chunk's (V, H) product is rounded
    # once and then summed in fp32 across chunks.
    if row_scale is not None:
        grad_logits = grad_logits.mul_(row_scale.unsqueeze(1))
    if grad_bias_acc is not None:
        grad_bias_acc += grad_logits.sum(dim=0)
    grad_logits = grad_logits.to(hidden_chunk.dtype)
    torch.mm(grad_logits, weight, out=grad_hidden_chunk)
    if first:
        grad_weight_acc.copy_(grad_logits.T @ hidden_chunk)
    else:
        grad_weight_acc += grad_logits.T @ hidden_chunk


def _softmax_rows_(
    logits: torch.Tensor,  # (c, V) fp32; overwritten with the row softmax p
    safe_labels: torch.Tensor,  # (c, 1) int64
    target_logit: torch.Tensor,  # (c,) logits[i, label_i]
    lse_in_loss: bool,  # label smoothing or z-loss: the loss reads lse
) -> tuple[torch.Tensor, torch.Tensor]:
    """(lse (c,), log p[label] (c,)), leaving the softmax in ``logits``.

    Rows of up to LOG_SOFTMAX_MAX_COLUMNS columns: ATen's in-place log_softmax then exp_,
    log p[label] read from it (as F.cross_entropy computes it) and lse = s_y - log p[label].
    ``max`` with its index (below) costs more than the whole softmax on such rows; on wide
    rows the max-and-softmax pass is the faster one. That lse carries the rounding of
    |log p[label]|, which exceeds lse's own when the label is far less likely than the
    row's top logit, so a loss that reads lse (smoothing, z-loss) takes the max pass.
    """
    if logits.shape[1] > LOG_SOFTMAX_MAX_COLUMNS or lse_in_loss:
        lse = _softmax_lse_(logits)
        return lse, target_logit - lse
    log_probs = torch.log_softmax(logits, dim=1, out=logits)  # (c, V)
    target_log_prob = log_probs.gather(1, safe_labels).squeeze(1)  # (c,)
    log_probs.exp_()
    return target_logit - target_log_prob, target_log_prob


def _softmax_lse_(logits: torch.Tensor) -> torch.Tensor:
    """Overwrite the (c, V) fp32 ``logits`` with their row softmax p; return the (c,)
    log-sum-exps. One cache-blocked pass per row (ATen's softmax) after a max, instead of
    logsumexp then exp(s - lse): lse = max - log p[argmax], where p[argmax] = 1 / Σ exp(s - max)
    lies in [1/V, 1], so it is as exact as logsumexp's own max + log Σ."""
    row_max, argmax = logits.max(dim=1, keepdim=True)  # (c, 1) each
    probs = torch.softmax(logits, dim=1, out=logits)
    return (row_max - probs.gather(1, argmax).log_()).squeeze(1)


def _new_grad_buffers(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    grad_hidden = torch.empty_like(hidden)  # (N, H), rows written chunk by chunk
    # written by the first chunk's GEMM (no zero fill, no read of zeros); zeros without rows
    new = torch.empty if hidden.shape[0] > 0 else torch.zeros
    grad_weight_acc = new(weight.shape, dtype=torch.float32, device=weight.device)
    grad_bias_acc = (
        None if bias is None else torch.zeros(bias.shape, dtype=torch.float32, device=bias.device)
    )
    return grad_hidden, grad_weight_acc, grad_bias_acc


def _finish_grads(
    grad_hidden: torch.Tensor,
    grad_weight_acc: torch.Tensor,
    grad_bias_acc: torch.Tensor | None,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    grad_weight = grad_weight_acc.to(weight.dtype)  # no copy for fp32
    grad_bias = None if bias is None else grad_bias_acc.to(bias.dtype)
    return grad_hidden, grad_weight, grad_bias


def ce_forward(
    hidden: torch.Tensor,  # (N, H) contiguous
    weight: torch.Tensor,  # (V, H) contiguous
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64, ignore_index where ignored
    opts: CrossEntropyOptions,
    row_coef: torch.Tensor | None = None,  # (N,) fp32
) -> tuple[
    torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None
]:
    """Per-row loss and log-sum-exp; with ``row_coef``, also the gradients of
    Σ_i row_coef[i]·loss[i] w.r.t. hidden, weight and bias, in the same pass.

    Returns (loss (N,) fp32, lse (N,) fp32, grad_hidden, grad_weight, grad_bias); the grads
    are None without ``row_coef`` (grad_bias also when bias is None). Ignored rows get
    loss 0 and zero gradient whatever their coefficient.
    """
    num_tokens = hidden.shape[0]
    vocab_size = weight.shape[0]
    device = hidden.device
    smoothing = opts.label_smoothing
    z_loss = opts.z_loss
    cap = opts.softcap

    chunk = chunk_rows(num_tokens, vocab_size, opts.chunk_size, device)
    if native.serves(hidden, weight, bias, cap):
        # the same chunks, each row's pass one native loop (drift_engine/csrc)
        loss, lse, *grads = torch.ops.drift_engine_native.ce_forward(
            hidden, weight, bias, labels, row_coef, opts.ignore_index, chunk, smoothing, z_loss
        )
        if row_coef is None:
            return loss, lse, None, None, None
        grad_hidden, grad_weight, grad_bias = grads
        return loss, lse, grad_hidden, grad_weight, None if bias is None else grad_bias
    # One chunk of every row (the small heads): its row results are the outputs, no copies.
    single_chunk = chunk >= num_tokens
    if not single_chunk:
        loss = torch.empty(num_tokens, dtype=torch.float32, device=device)
        lse = torch.empty(num_tokens, dtype=torch.float32, device=device)
    ignored = labels == opts.ignore_index  # (N,)
    all_safe_labels = labels.masked_fill(ignored, 0).unsqueeze(1)  # (N, 1)
    with_grad = row_coef is not None
    if with_grad:
        grad_hidden, grad_weight_acc, grad_bias_acc = _new_grad_buffers(hidden, weight, bias)
        coefs = row_coef.masked_fill(ignored, 0.0)  # (N,)

    buffer = _logits_buffer(hidden, weight, chunk)
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        hidden_chunk = hidden[start:end]  # (c, H)
        ignored_chunk = ignored[start:end]  # (c,)
        safe_labels = all_safe_labels[start:end]  # (c, 1)

        logits = _logits_fp32(hidden_chunk, weight, bias, buffer)  # (c, V) fp32
        if cap is not None:
            # tanh kept for the derivative d softcap / d x = 1 - tanh².
            tanh = torch.tanh(logits.div_(cap))  # (c, V); logits now holds x / cap
            logits = torch.mul(tanh, cap, out=logits)  # (c, V) capped logits s
        target_logit = logits.gather(1, safe_labels).squeeze(1)  # (c,)
        mean_logit = logits.mean(dim=1) if smoothing > 0.0 else None  # (c,)
        # (c,) each; logits now holds the softmax p
        lse_chunk, target_log_prob = _softmax_rows_(
            logits, safe_labels, target_logit, lse_in_loss=smoothing > 0.0 or z_loss > 0.0
        )
        probs = logits
        row_loss = target_log_prob * -(1.0 - smoothing)
        if smoothing > 0.0:
            row_loss += smoothing * (lse_chunk - mean_logit)
        if z_loss > 0.0:
            row_loss += z_loss * lse_chunk.square()
        row_loss.masked_fill_(ignored_chunk, 0.0)
        if single_chunk:
            loss, lse = row_loss, lse_chunk
        else:
            loss[start:end] = row_loss
            lse[start:end] = lse_chunk

        if not with_grad:
            continue
        # d loss / d s_j = p_j (1 + 2 z lse) - (1 - ε) δ_jy - ε / V; each row's coefficient is
        # applied by _accumulate_grads.
        grad_logits = probs
        if z_loss > 0.0:
            grad_logits *= (1.0 + 2.0 * z_loss * lse_chunk).unsqueeze(1)
        grad_logits.scatter_add_(
            1, safe_labels, torch.full_like(safe_labels, -(1.0 - smoothing), dtype=torch.float32)
        )
        if smoothing > 0.0:
            grad_logits -= smoothing / vocab_size
        if cap is not None:
            grad_logits *= 1.0 - tanh.square_()  # chain rule through s = cap·tanh(x / cap)
        _accumulate_grads(
            grad_logits,
            hidden_chunk,
            weight,
            grad_hidden[start:end],
            grad_weight_acc,
            grad_bias_acc,
            first=start == 0,
            row_scale=coefs[start:end],
        )

    if num_tokens == 0:
        loss = torch.empty(0, dtype=torch.float32, device=device)
        lse = torch.empty(0, dtype=torch.float32, device=device)
    if not with_grad:
        return loss, lse, None, None, None
    return (loss, lse, *_finish_grads(grad_hidden, grad_weight_acc, grad_bias_acc, weight, bias))


def logprobs_forward(
    hidden: torch.Tensor,  # (N, H) contiguous
    weight: torch.Tensor,  # (V, H) contiguous
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64
    opts: LogProbOptions,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns (logprobs (N,) fp32, entropy (N,) fp32 or None, lse (N,) fp32).

    Over s = (hidden @ weight.T + bias) / temperature: logprob = s[label] - lse (0 for ignored
    rows), entropy = lse - Σ_j softmax(s)_j s_j = -Σ_j p_j log p_j (for every row),
    lse = logsumexp(s).
    """
    num_tokens = hidden.shape[0]
    device = hidden.device
    inv_temperature = 1.0 / opts.temperature
    logprobs = torch.empty(num_tokens, dtype=torch.float32, device=device)
    lse = torch.empty(num_tokens, dtype=torch.float32, device=device)
    entropy = (
        torch.empty(num_tokens, dtype=torch.float32, device=device) if opts.return_entropy else None
    )

    chunk = chunk_rows(num_tokens, weight.shape[0], opts.chunk_size, device)
    buffer = _logits_buffer(hidden, weight, chunk)
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        labels_chunk = labels[start:end]  # (c,)
        valid = labels_chunk != opts.ignore_index
        safe_labels = torch.where(valid, labels_chunk, 0).unsqueeze(1)  # (c, 1)

        scaled = _logits_fp32(hidden[start:end], weight, bias, buffer)  # (c, V) fp32
        if opts.temperature != 1.0:
            scaled *= inv_temperature
        target = scaled.gather(1, safe_labels).squeeze(1)  # (c,)
        if entropy is not None:
            # -Σ p log p rather than lse - Σ p s, which cancels two large numbers when the
            # logits are large; log_softmax normalises with (s - max) - log Σ exp(s - max),
            # more precisely than s - lse with lse rounded to fp32.
            log_probs = torch.log_softmax(scaled, dim=1)  # (c, V)
        lse_chunk = _softmax_lse_(scaled)  # (c,); scaled now holds p
        logprobs[start:end] = torch.where(valid, target - lse_chunk, 0.0)
        lse[start:end] = lse_chunk
        if entropy is not None:
            entropy[start:end] = -(torch.exp(log_probs) * log_probs).sum(dim=1)
    return logprobs, entropy, lse


def logprobs_backward(
    hidden: torch.Tensor,  # (N, H) contiguous
    weight: torch.Tensor,  # (V, H) contiguous
    bias: torch.Tensor | None,  # (V,)
    labels: torch.Tensor,  # (N,) int64
    lse: torch.Tensor,  # (N,) fp32 from logprobs_forward; part of the contract, unused here
    grad_logprobs: torch.Tensor | None,  # (N,)
    grad_entropy: torch.Tensor | None,  # (N,)
    opts: LogProbOptions,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Gradients of Σ_i (grad_logprobs[i]·logprob[i] + grad_entropy[i]·entropy[i]) w.r.t.
    hidden, weight and bias, recomputing each chunk's logits.

    With p = softmax(s) and s = x / T:
        d logprob / d s_j = δ_jy - p_j,   d entropy / d s_j = -p_j (s_j - Σ_k p_k s_k),
    and d s / d x = 1 / T.
    """
    num_tokens = hidden.shape[0]
    device = hidden.device
    inv_temperature = 1.0 / opts.temperature
    grad_hidden, grad_weight_acc, grad_bias_acc = _new_grad_buffers(hidden, weight, bias)

    chunk = chunk_rows(num_tokens, weight.shape[0], opts.chunk_size, device)
    buffer = _logits_buffer(hidden, weight, chunk)
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        hidden_chunk = hidden[start:end]  # (c, H)
        scaled = _logits_fp32(hidden_chunk, weight, bias, buffer)  # (c, V) fp32
        if opts.temperature != 1.0:
            scaled *= inv_temperature
        if grad_entropy is None and grad_logprobs is not None:
            # g·(δ_jy - p_j) / T = diag(-g / T)·(p - δ): the softmax in place, the row scale
            # applied by _accumulate_grads.
            labels_chunk = labels[start:end]
            valid = labels_chunk != opts.ignore_index
            safe_labels = torch.where(valid, labels_chunk, 0).unsqueeze(1)  # (c, 1)
            grad_lp = torch.where(valid, grad_logprobs[start:end].float(), 0.0)  # (c,)
            grad_logits = torch.softmax(scaled, dim=1, out=scaled)  # (c, V) p
            grad_logits.scatter_add_(1, safe_labels, torch.full_like(grad_lp, -1.0).unsqueeze(1))
            _accumulate_grads(
                grad_logits,
                hidden_chunk,
                weight,
                grad_hidden[start:end],
                grad_weight_acc,
                grad_bias_acc,
                first=start == 0,
                row_scale=grad_lp.mul_(-inv_temperature),
            )
            continue
        # Normalised afresh rather than as s - lse[start:end]: an fp32 lse carries an error of
        # half an ulp of |lse| into every log-prob, which the (nearly cancelling) entropy
        # gradient amplifies. The saved lse is what the Triton backend, which never holds a
        # whole row, needs; here the rows are at hand.
        log_probs = torch.log_softmax(scaled, dim=1)  # (c, V)
        del scaled
        probs = torch.exp(log_probs)  # (c, V)

        grad_logits = None  # (c, V) fp32, built in the buffers of log_probs / probs
        if grad_entropy is not None:
            # s_j - Σ_k p_k s_k computed as log p_j - Σ_k p_k log p_k (no cancellation of
            # large logits).
            mean_log_prob = (probs * log_probs).sum(dim=1, keepdim=True)  # (c, 1)
            grad_logits = log_probs.sub_(mean_log_prob).mul_(probs)
            grad_logits *= -grad_entropy[start:end].float().unsqueeze(1)
        if grad_logprobs is not None:
            labels_chunk = labels[start:end]
            valid = labels_chunk != opts.ignore_index
            safe_labels = torch.where(valid, labels_chunk, 0).unsqueeze(1)  # (c, 1)
            grad_lp = torch.where(valid, grad_logprobs[start:end].float(), 0.0)  # (c,)
            logprob_term = probs.mul_(-grad_lp.unsqueeze(1))  # -g p_j
            if grad_logits is None:
                grad_logits = logprob_term
            else:
                grad_logits += logprob_term
            grad_logits.scatter_add_(1, safe_labels, grad_lp.unsqueeze(1))  # + g δ_jy
        if grad_logits is None:
            grad_logits = probs.zero_()
        if opts.temperature != 1.0:
            grad_logits *= inv_temperature
        _accumulate_grads(
            grad_logits,
            hidden_chunk,
            weight,
            grad_hidden[start:end],
            grad_weight_acc,
            grad_bias_acc,
            first=start == 0,
        )
    return _finish_grads(grad_hidden, grad_weight_acc, grad_bias_acc, weight, bias)
