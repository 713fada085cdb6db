"""Masked reductions, whitening and log-probabilities: the building blocks of the PPO math.

Every function is pure (tensors and floats in, tensors out) and imports only torch. Masks are 0/1
tensors (bool or numeric) of the same shape as the values; a position counts when its mask is
non-zero. Values at masked positions never reach a result, even when they are NaN or inf.

Where a statistic has to span data-parallel ranks (token means, whitening), the functions take the
global counts or moments as arguments and the caller does the all-reduce; see `masked_mean` and
`masked_whiten`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "entropy_from_logits",
    "logprobs_from_logits",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "moments_to_mean_var",
]

_WHITEN_EPS = 1e-8


def _valid(mask: torch.Tensor) -> torch.Tensor:
    return mask.bool() if mask.dtype != torch.bool else mask


def _safe_denominator(denom: torch.Tensor) -> torch.Tensor:
    # An empty selection gives sum 0 over denominator 1 = 0. Replacing the denominator (rather than
    # the quotient) keeps gradients finite: torch.where would still backpropagate 0/0 = NaN.
    return torch.where(denom != 0, denom, torch.ones_like(denom))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of `x` over the positions where `mask` is set.

    Formula: sum_i x_i * m_i

    Args:
        x: values, e.g. (B, T).
        mask: 0/1 mask broadcastable to `x`.
        dim: reduce only this dimension; None reduces everything to a scalar.

    Returns:
        Scalar, or `x` with `dim` removed. 0 where nothing is selected.
    """
    selected = torch.where(_valid(mask), x, torch.zeros_like(x))  # x_i * m_i, NaN-safe
    return selected.sum() if dim is None else selected.sum(dim)


def masked_mean(
    x: torch.Tensor,
    mask: torch.Tensor,
    dim: int | None = None,
    denom: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean of `x` over the positions where `mask` is set; 0 (never NaN) when nothing is selected.

    Formula: sum_i x_i * m_i / sum_i m_i        (or  sum_i x_i * m_i / denom  when `denom` is given)

    Token means across data-parallel ranks: DeepSpeed averages gradients over the world size W and
    over the gradient-accumulation steps G (it scales each micro-batch loss by 1/G). A per-rank
    `masked_mean` therefore weights every rank and micro-batch equally, whatever its token count,
    which over-weights the tokens of short batches. To get the true mean over all N tokens of an
    optimizer step, all-reduce the token count first and pass

        denom = N / (W * G)        # N = global masked-token count of the optimizer step

    so that the averaged gradient is (1/(W*G)) * sum_r grad(S_r / denom) = grad(sum_r S_r / N).

    Args:
        x: values, e.g. (B, T).
        mask: 0/1 mask of the same shape as `x`.
        dim: reduce only this dimension (per-sequence means for dim=1); None gives a scalar.
        denom: replaces the local count sum(mask); a float or tensor. A zero denominator gives 0.

    Returns:
        Scalar, or `x` with `dim` removed.
    """
    total = masked_sum(x, mask, dim)
    if denom is None:
        count = masked_sum(torch.ones_like(x), mask, dim)  # sum_i m_i
    else:
        count = torch.as_tensor(denom, dtype=total.dtype, device=total.device)
    return total / _safe_denominator(count)  # sum_i x_i m_i / sum_i m_i


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of `x` over the positions where `mask` is set (two-pass, numerically stable).

    Formula: var = sum_i m_i (x_i - mean)^2 / n,   times n / (n - 1) when unbiased,   n = sum_i m_i

    Matches TRL's `masked_var`, except that n = 0 gives 0 instead of raising and, when unbiased,
    n = 1 gives 0 instead of 0/0.

    Args:
        x: values, e.g. (B, T).
        mask: 0/1 mask of the same shape as `x`.
        unbiased: apply Bessel's correction n / (n - 1).

    Returns:
        Scalar tensor.
    """
    mean = masked_mean(x, mask)
    var = masked_mean((x - mean) ** 2, mask)  # sum m (x - mean)^2 / n
    if unbiased:
        n = masked_sum(torch.ones_like(x), mask)
        var = var * n / _safe_denominator(torch.clamp(n - 1, min=0))  # * n / (n - 1)
    return var


def masked_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Sufficient statistics (sum, sum of squares, count) of the masked values, for an all-reduce.

    Formula: (sum_i m_i x_i,  sum_i m_i x_i^2,  sum_i m_i)

    Computed in float64 so that `moments_to_mean_var`, which subtracts two large numbers, keeps its
    precision. Typical use across ranks:

        moments = torch.stack(masked_moments(adv, mask)); dist.all_reduce(moments)
        mean, var = moments_to_mean_var(*moments)
        adv = masked_whiten(adv, mask, mean=mean, var=var)

    Args:
        x: values, e.g. (B, T).
        mask: 0/1 mask of the same shape as `x`.

    Returns:
        Three float64 scalar tensors: (sum, sum_sq, count).
    """
    x64 = x.detach().to(torch.float64)
    ones = torch.ones_like(x64)
    return masked_sum(x64, mask), masked_sum(x64 * x64, mask), masked_sum(ones, mask)


def moments_to_mean_var(
    total: float | torch.Tensor,
    total_sq: float | torch.Tensor,
    count: float | torch.Tensor,
    unbiased: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and variance from (possibly all-reduced) moments of `masked_moments`.

    Formula: mean = S / n,   var = (S2 - S * mean) / n,   times n / (n - 1) when unbiased

    n = 0 gives (0, 0); with `unbiased`, n = 1 gives variance 0. The variance is clamped at 0
    against rounding.

    Args:
        total: S = sum of the values.
        total_sq: S2 = sum of the squared values.
        count: n = number of values.
        unbiased: apply Bessel's correction n / (n - 1).

    Returns:
        (mean, var) as float64 scalar tensors on the device of `total`.
    """
    total = torch.as_tensor(total, dtype=torch.float64)
    total_sq = torch.as_tensor(total_sq, dtype=total.dtype, device=total.device)
    count = torch.as_tensor(count, dtype=total.dtype, device=total.device)
    mean = total / _safe_denominator(count)  # S / n
    sq_dev = torch.clamp(total_sq - total * mean, min=0)  # sum (x - mean)^2 = S2 - S * mean
    dof = torch.clamp(count - 1, min=0) if unbiased else count
    return mean, sq_dev / _safe_denominator(dof)  # / (n - 1)  or  / n


def masked_whiten(
    x: torch.Tensor,
    mask: torch.Tensor,
    shift_mean: bool = True,
    mean: float | torch.Tensor | None = None,
    var: float | torch.Tensor | None = None,
) -> torch.Tensor:
    """Normalise `x` to zero mean and unit variance over the masked positions.

    Formula: y = (x - mean) * rsqrt(var + 1e-8),   y += mean  when not shift_mean,   y = 0 where m = 0

    `var` is the unbiased masked variance (var_biased * n / (n - 1)), as in TRL's `masked_whiten`.
    By default mean and variance come from this tensor alone. To whiten with statistics over all
    data-parallel ranks, pass the global `mean` and `var` from `masked_moments` (all-reduced) and
    `moments_to_mean_var(..., unbiased=True)`; they are used as given.

    Advantages are whitened once per rollout batch, over the whole batch of all ranks, right after
    `gae`; the blog-era TRL code whitened them again per minibatch, which gives every minibatch
    zero-mean advantages and so depends on how the batch happens to be split.

    Args:
        x: values, e.g. advantages (B, T).
        mask: 0/1 mask of the same shape as `x`.
        shift_mean: False adds the mean back (rescale only), as TRL does for `whiten_rewards`.
        mean: precomputed global mean; give together with `var`.
        var: precomputed global unbiased variance; give together with `mean`.

    Returns:
        Tensor shaped like `x`, zero where `mask` is 0.
    """
    if (mean is None) != (var is None):
        raise ValueError("masked_whiten: pass both `mean` and `var` (global statistics) or neither")
    if mean is None:
        mean, var = masked_mean(x, mask), masked_var(x, mask, unbiased=True)
    mean = torch.as_tensor(mean, device=x.device).to(x.dtype)
    var = torch.as_tensor(var, device=x.device).to(x.dtype)
    whitened = (x - mean) * torch.rsqrt(var + _WHITEN_EPS)  # (x - mean) / sqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(_valid(mask), whitened, torch.zeros_like(whitened))


def _float_chunk(chunk: torch.Tensor) -> torch.Tensor:
    # bf16/fp16 -> fp32 for the softmax; fp32/fp64 stay as they are (no copy).
    return chunk.to(torch.promote_types(chunk.dtype, torch.float32))


def logprobs_from_logits(logits: torch.Tensor, tokens: torch.Tensor, chunk_rows: int = 1) -> torch.Tensor:
    """Log-probability of each token under the logits at the same position.

    Formula: logp_t = logits_t[y_t] - logsumexp_v logits_t[v]        (= log_softmax(logits_t)[y_t])

    The caller aligns the two: `logits[:, t]` is the distribution that predicts `tokens[:, t]`
    (for a causal LM, pass `logits[:, :-1]` with `ids[:, 1:]`). Memory: the full (B, T, V)
    log-softmax is never built; rows are processed `chunk_rows` at a time, each upcast to fp32 if
    it is bf16/fp16, so the extra memory without autograd is one (chunk_rows, T, V) fp32 chunk.
    (With autograd, the fp32 chunks are kept for the backward pass.)

    Args:
        logits: (B, T, V), any float dtype.
        tokens: (B, T) token ids, int64.
        chunk_rows: batch rows per chunk.

    Returns:
        (B, T) log-probabilities in fp32 (fp64 for fp64 logits).
    """
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        chunk = _float_chunk(logits[start : start + chunk_rows])  # (b, T, V)
        ids = tokens[start : start + chunk_rows].unsqueeze(-1)  # (b, T, 1)
        picked = torch.gather(chunk, -1, ids).squeeze(-1)  # (b, T)
        out.append(picked - torch.logsumexp(chunk, dim=-1))  # logits[y] - logsumexp(logits)
    return torch.cat(out, dim=0) if out else logits.new_zeros(tokens.shape, dtype=torch.float32)


def entropy_from_logits(logits: torch.Tensor, chunk_rows: int = 1) -> torch.Tensor:
    """Entropy of the categorical distribution at each position.

    Formula: H_t = -sum_v p_t(v) log p_t(v) = logsumexp_v logits_t[v] - sum_v p_t(v) logits_t[v]

    Processed `chunk_rows` batch rows at a time in fp32, like `logprobs_from_logits`.

    Args:
        logits: (B, T, V), any float dtype.
        chunk_rows: batch rows per chunk.

    Returns:
        (B, T) entropies in nats, fp32 (fp64 for fp64 logits).
    """
    out = []
    for start in range(0, logits.shape[0], chunk_rows):
        chunk = _float_chunk(logits[start : start + chunk_rows])  # (b, T, V)
        probs = F.softmax(chunk, dim=-1)
        p_logits = torch.where(probs > 0, probs * chunk, torch.zeros_like(chunk))  # 0 * -inf -> 0
        out.append(torch.logsumexp(chunk, dim=-1) - p_logits.sum(-1))  # lse - sum_v p * logits
    return torch.cat(out, dim=0) if out else logits.new_zeros(logits.shape[:2], dtype=torch.float32)
