"""Bad input gets a clear Python exception naming the argument — never a crash or silent garbage."""
import pytest
import torch

from sdcore import StepCoefficients, ops

A = torch.randn(1, 2, 8, 16)
X = torch.randn(2, 32, 4, 4)
S = torch.randn(1, 4, 8, 8)
DDIM = StepCoefficients(x0_from_sample=1.2, x0_from_output=-0.5, next_from_x0=0.8, next_from_output=0.3)

CASES = {
    # attention
    "attn q rank": (lambda: ops.attention(A[0], A, A), RuntimeError, "q must be 4-D"),
    "attn k rank": (lambda: ops.attention(A, A[0], A), RuntimeError, "k must be 4-D"),
    "attn k heads": (lambda: ops.attention(A, torch.randn(1, 3, 8, 16), torch.randn(1, 3, 8, 16)), RuntimeError,
                     "k must have shape [1, 2, M, 16]"),
    "attn k head dim": (lambda: ops.attention(A, torch.randn(1, 2, 8, 8), torch.randn(1, 2, 8, 8)), RuntimeError,
                        "k must have shape"),
    "attn v shape": (lambda: ops.attention(A, A, torch.randn(1, 2, 9, 16)), RuntimeError,
                     "v must have the shape of k"),
    "attn mixed dtype": (lambda: ops.attention(A, A.double(), A), TypeError, "k has dtype Double"),
    "attn int dtype": (lambda: ops.attention(A.long(), A.long(), A.long()), TypeError,
                       "q must be float32, float16 or bfloat16"),
    "attn D > 512": (lambda: ops.attention(*[torch.randn(1, 1, 4, 513)] * 3), RuntimeError,
                     "head dim D = 513 is larger than the supported maximum 512"),
    "attn empty q": (lambda: ops.attention(torch.randn(1, 2, 0, 16), A, A), RuntimeError, "q is empty"),
    "attn empty k": (lambda: ops.attention(A, torch.randn(1, 2, 0, 16), torch.randn(1, 2, 0, 16)), RuntimeError,
                     "k is empty"),
    "attn bad scale": (lambda: ops.attention(A, A, A, scale=float("nan")), RuntimeError, "scale must be finite"),
    "attn mixed device": (lambda: ops.attention(A, A.to("meta"), A), RuntimeError, "k is on meta"),
    # group_norm
    "gn groups divide": (lambda: ops.group_norm(X, 5), RuntimeError, "C = 32 must be divisible by num_groups = 5"),
    "gn zero groups": (lambda: ops.group_norm(X, 0), RuntimeError, "num_groups must be positive"),
    "gn rank": (lambda: ops.group_norm(torch.randn(32), 4), RuntimeError, "at least 2-D"),
    "gn weight shape": (lambda: ops.group_norm(X, 4, torch.randn(16)), RuntimeError, "weight must have shape [32]"),
    "gn bias shape": (lambda: ops.group_norm(X, 4, None, torch.randn(32, 1)), RuntimeError,
                      "bias must have shape [32]"),
    "gn int dtype": (lambda: ops.group_norm(X.int(), 4), TypeError, "x must be float32, float16 or bfloat16"),
    "gn empty": (lambda: ops.group_norm(torch.randn(0, 32, 4, 4), 4), RuntimeError, "x is empty"),
    "gn negative eps": (lambda: ops.group_norm(X, 4, eps=-1.0), RuntimeError, "eps must be a finite number >= 0"),
    # scheduler_step
    "step output shape": (lambda: ops.scheduler_step(torch.randn(1, 4, 8, 9), S, DDIM), RuntimeError,
                          "model_output must have the shape of sample"),
    "step cfg batch": (lambda: ops.scheduler_step(S, S, DDIM, guidance_scale=7.5), RuntimeError,
                       "model_output must be [2*B, ...]"),
    "step history shape": (lambda: ops.scheduler_step(S, S, StepCoefficients(history=(0.5,)),
                                                      history=[torch.randn(1, 4, 8, 7)]), RuntimeError,
                           "history[0] must have the shape of sample"),
    "step history count": (lambda: ops.scheduler_step(S, S, DDIM, history=[S]), ValueError,
                           "1 history tensors for 0 history coefficients"),
    "step too much history": (lambda: StepCoefficients(history=(1, 2, 3, 4, 5)), ValueError,
                              "at most 4 history coefficients"),
    "step missing noise": (lambda: ops.scheduler_step(S, S, StepCoefficients(next_from_noise=0.3)), RuntimeError,
                           "no noise tensor was given"),
    "step noise shape": (lambda: ops.scheduler_step(S, S, StepCoefficients(next_from_noise=0.3),
                                                    noise=torch.randn(2, 4, 8, 8)), RuntimeError,
                         "noise must have the shape of sample"),
    "step mixed dtype": (lambda: ops.scheduler_step(S.half(), S, DDIM), TypeError,
                         "model_output has dtype Half but sample has dtype Float"),
    "step empty": (lambda: ops.scheduler_step(torch.randn(0, 4), torch.randn(0, 4), DDIM), RuntimeError,
                   "sample is empty"),
    "step nan coeff": (lambda: ops.scheduler_step(S, S, StepCoefficients(next_from_x0=float("inf"))), RuntimeError,
                       "coeffs must be finite"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name):
    fn, exc, fragment = CASES[name]
    with pytest.raises(exc) as info:
        fn()
    assert fragment in str(info.value), f"message was: {info.value}"


def test_at_least_fifteen_cases():
    assert len(CASES) >= 15


def test_raw_op_rejects_wrong_coefficient_count():
    with pytest.raises(RuntimeError, match="coeffs must hold 10 numbers"):
        torch.ops.sdcore.scheduler_step(S, S, [1.0, 2.0], [], [], None, None, True)


def test_raw_op_rejects_history_coefficient_mismatch():
    with pytest.raises(RuntimeError, match="history has 1 tensors but history_coeffs has 0"):
        torch.ops.sdcore.scheduler_step(S, S, DDIM.packed(), [S], [], None, None, True)
